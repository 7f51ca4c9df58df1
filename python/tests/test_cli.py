"""`python -m ntpy.arch` on a model defined in a file, on torchvision, and
its errors: one line on stderr, exit 1, no traceback."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import PYTHON_DIR, REPO
from ntpy.arch.cli import main

MODEL_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn

    from helpers import conv_block  # a neighbour of this file


    class Net(nn.Module):
        def __init__(self, classes=10):
            super().__init__()
            self.features = conv_block(1, 6)
            self.fc = nn.Linear(6 * 14 * 14, classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.features(x), 1))


    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 4)

        def forward(self, x):
            return self.rnn(x)[0]
    """
)

HELPERS = textwrap.dedent(
    """
    from torch import nn


    def conv_block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))
    """
)


def ntpy(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    return subprocess.run(
        [sys.executable, "-m", "ntpy.arch", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "model.py").write_text(MODEL_FILE)
    (tmp_path / "helpers.py").write_text(HELPERS)
    return tmp_path


def test_import_a_model_from_a_file(model_dir):
    out = ntpy("import", str(model_dir / "model.py") + ":Net", "--input", "1,28,28", "--kwargs", '{"classes": 5}',
               "-o", str(model_dir / "net.json"))
    assert out.returncode == 0, out.stderr
    spec = json.loads((model_dir / "net.json").read_text())
    assert spec["name"] == "Net" and spec["input"] == [1, 28, 28]
    assert [n["name"] for n in spec["nodes"] if n["op"] in ("conv2d", "batch_norm", "linear")] == [
        "features.0", "features.1", "fc",
    ]
    assert "Net: 5,957 parameters, 6 nodes, input [1, 28, 28]; the spec's module matches the model" in out.stderr

    out = ntpy("module", str(model_dir / "net.json"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Net: 5,957 parameters, 6 nodes, input [1, 28, 28], output [5]"


# The rest run main() in this process: a process per case would spend its
# time importing torch.


def test_import_prints_the_spec_on_stdout_from_a_relative_path(model_dir, monkeypatch, capsys):
    monkeypatch.chdir(model_dir)
    assert main(["import", "model.py:Net", "--input", "1x28x28", "--name", "net"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "net"


def test_import_a_torchvision_model(capsys):
    args = ["import", "torchvision.models:mobilenet_v2", "--input", "3,32,32", "--kwargs", '{"num_classes": 10}']
    assert main(args) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["name"] == "mobilenet_v2" and spec["nodes"][-1]["out"] == 10


def test_module_reads_a_checkpoints_architecture_and_weights(capsys):
    path = os.path.join(REPO, "fuzz", "corpus", "checkpoint", "seed-mlp_k2-with-arch.safetensors")
    assert main(["module", path, "--print"]) == 0
    out = capsys.readouterr().out
    assert "(fc1): Linear(in_features=32, out_features=24, bias=False)" in out
    assert out.strip().endswith(f"output [10]; weights loaded from {path}")


@pytest.mark.parametrize(
    "args, message",
    [
        (["import", "{dir}/model.py:Recurrent", "--input", "4"],
         "unsupported module torch.nn.GRU at node `rnn` (target `rnn`"),
        (["import", "{dir}/model.py:Missing", "--input", "4"], "model.py has no `Missing`"),
        (["import", "{dir}/nowhere.py:Net", "--input", "4"], "no file {dir}/nowhere.py"),
        (["import", "no_such_package.models:net", "--input", "4"], "cannot import no_such_package.models"),
        (["import", "Net", "--input", "4"], "MODEL must be `package.module:callable`"),
        (["import", "{dir}/model.py:Net", "--input", "1,28"], "--input must be C,H,W or FEATURES"),
        (["import", "{dir}/model.py:Net", "--input", "1,28,28", "--kwargs", "{{"], "--kwargs is not JSON"),
        (["import", "{dir}/model.py:Net", "--input", "1,28,28", "--kwargs", '{{"layers": 3}}'],
         "calling {dir}/model.py:Net failed: TypeError"),
        (["import", "{dir}/model.py:Net", "--input", "3,28,28"], "the model fails on an example input"),
        (["module", "{dir}/missing.json"], "cannot read {dir}/missing.json"),
        (["module", "{dir}/model.py"], "is not JSON"),
    ],
    ids=["unsupported", "no-attr", "no-file", "no-package", "no-colon", "bad-input", "bad-kwargs",
         "bad-call", "bad-shape", "no-spec", "not-json"],
)
def test_errors_are_one_message_and_exit_1(model_dir, args, message, capsys):
    # main() returning 1 is what `python -m` exits with; an exception would
    # be a traceback.
    assert main([a.format(dir=model_dir) for a in args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m ntpy.arch: error: ") and err.count("\n") == 1, err
    assert message.format(dir=model_dir) in err, err


def test_a_user_error_in_a_process_prints_no_traceback(model_dir):
    out = ntpy("import", str(model_dir / "model.py") + ":Recurrent", "--input", "4")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stderr.startswith("python -m ntpy.arch: error: unsupported module torch.nn.GRU"), out.stderr
    assert "Traceback" not in out.stderr
