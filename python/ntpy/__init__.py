"""Python side of nt: architecture specs (`ntpy.arch`) from and to PyTorch modules."""

__version__ = "0.1.0"
