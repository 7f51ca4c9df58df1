"""Tests run against this checkout's `python/ntpy` (not an installed copy),
from any working directory."""

import functools
import os
import sys

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(PYTHON_DIR)
sys.path.insert(0, PYTHON_DIR)


@functools.lru_cache(maxsize=None)
def torchvision_import(name):
    """(model, spec) of a torchvision model (num_classes=10) imported for
    32x32 inputs; shared by the tests that need it, made once."""
    import torch
    import torchvision

    from ntpy.arch import arch_from_module

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    return model, arch_from_module(model, torch.randn(2, 3, 32, 32), name=name)
