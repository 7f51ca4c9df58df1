"""The committed gRPC stubs are what `proto/` generates today: a proto
change without `python -m ntpy.client.generate` fails here."""

import filecmp
import os

from conftest import PYTHON_DIR, REPO
from ntpy.client.generate import generate


def test_the_committed_stubs_are_fresh(tmp_path):
    generate(os.path.join(REPO, "proto"), str(tmp_path))
    committed = os.path.join(PYTHON_DIR, "ntpy", "_proto")
    stale = []
    for folder in ("", "nt", os.path.join("nt", "v1")):
        fresh = sorted(n for n in os.listdir(tmp_path / folder) if n.endswith((".py", ".pyi")))
        mine = sorted(n for n in os.listdir(os.path.join(committed, folder)) if n.endswith((".py", ".pyi")))
        assert fresh == mine, f"{folder or '.'}: generated {fresh}, committed {mine}"
        for name in fresh:
            if not filecmp.cmp(tmp_path / folder / name, os.path.join(committed, folder, name), shallow=False):
                stale.append(os.path.join(folder, name))
    assert not stale, f"stale stubs {stale}: run `python -m ntpy.client.generate` in python/ and commit"
