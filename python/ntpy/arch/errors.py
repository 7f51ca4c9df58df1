"""The errors of `ntpy.arch`. All are `ValueError`s: they mean bad input (a
module nt.arch/v1 cannot express, a malformed spec), never a bug."""

from __future__ import annotations


class ArchError(ValueError):
    """Base class: the message says what is wrong and where."""


class SpecError(ArchError):
    """A spec that is not valid nt.arch/v1 (a missing or unknown field, an
    unknown input, a cycle, ...); the message names the node or field."""


class UnsupportedModule(ArchError):
    """A PyTorch module nt.arch/v1 cannot express: an unsupported layer or
    function, a layer setting without an nt equivalent, or a forward that
    torch.fx cannot trace. `node` is the torch.fx node where it was met
    (None when tracing failed before there was a graph) and `target` the
    module path or function there."""

    def __init__(self, message: str, node: str | None = None, target: str | None = None):
        super().__init__(message)
        self.node = node
        self.target = target
