"""PyTorch modules of nt's presets for the benchmarks: `ntctl arch show`
prints a preset's spec and ntpy's module_from_arch builds it, so the module
has the state_dict names and the forward of the model nt trains, and loads
nt's checkpoints as they are.

    preset("mlp:input=3072,hidden=512,depth=2"), preset("resnet18")
"""

import functools
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ntpy from this checkout, whether or not `make setup` installed it.
sys.path.insert(0, os.path.join(ROOT, "python"))
from ntpy.arch import module_from_arch  # noqa: E402

NTCTL = os.environ.get("NTCTL", os.path.join(ROOT, "target", "release", "ntctl"))


@functools.lru_cache(maxsize=None)
def preset_spec(name):
    """The nt.arch/v1 spec (JSON text) of a preset such as `resnet18:classes=100`."""
    out = subprocess.run([NTCTL, "--output", "json", "arch", "show", name], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{NTCTL} arch show {name}: {out.stderr.strip()}")
    return out.stdout


def preset(name):
    """A fresh PyTorch module of an nt preset, initialised as PyTorch does."""
    return module_from_arch(preset_spec(name))
