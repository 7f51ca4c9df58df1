"""`module_from_arch`: a plain PyTorch module for any nt.arch/v1 spec.

Layers with parameters are submodules at their node's dotted name (node
`layer1.0.conv1` is `model.layer1[0].conv1`), so the module's state_dict
names are the spec's and `load_state_dict(strict=True)` takes nt's
checkpoints as they are. The other ops run as torch functions in forward,
which walks the spec's graph in topological order and drops each
intermediate result after its last reader.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SpecError
from .spec import MODEL_INPUT, Plan, Source, load_spec, resolve


class Group(nn.Module):
    """An inner part of a dotted name (`layer1` and `layer1.0` of
    `layer1.0.conv1`): it holds layers and has no forward of its own.
    `group[0]` is `getattr(group, "0")`, as in an `nn.Sequential`."""

    def __getitem__(self, key):
        return self._modules[str(key)]

    def __len__(self):
        return len(self._modules)


@dataclass(frozen=True)
class _Step:
    op: str
    name: str  # the node's name: the submodule's path for layers with parameters
    fields: dict
    inputs: tuple  # slots read: 0 is the model input, k + 1 the k-th step's result
    release: tuple  # slots whose last reader is this step


def _layer(module, step, xs):
    return module.get_submodule(step.name)(xs[0])


def _pool(fn):
    def apply(module, step, xs):
        f = step.fields
        return fn(xs[0], f["kernel"], f["stride"], f["padding"])

    return apply


def _adaptive(module, step, xs):
    out = step.fields["output"]
    return F.adaptive_avg_pool2d(xs[0], tuple(out) if isinstance(out, list) else out)


# What each op does to its inputs. Module-level functions, so the module
# pickles and deep-copies.
_APPLY = {
    "linear": _layer,
    "conv2d": _layer,
    "batch_norm": _layer,
    "relu": lambda m, s, xs: F.relu(xs[0]),
    "relu6": lambda m, s, xs: F.relu6(xs[0]),
    "hardtanh": lambda m, s, xs: F.hardtanh(xs[0], s.fields["min"], s.fields["max"]),
    "leaky_relu": lambda m, s, xs: F.leaky_relu(xs[0], s.fields["slope"]),
    "gelu": lambda m, s, xs: F.gelu(xs[0], approximate=s.fields["approximate"]),
    "silu": lambda m, s, xs: F.silu(xs[0]),
    "hardswish": lambda m, s, xs: F.hardswish(xs[0]),
    "sigmoid": lambda m, s, xs: torch.sigmoid(xs[0]),
    "tanh": lambda m, s, xs: torch.tanh(xs[0]),
    "max_pool2d": _pool(F.max_pool2d),
    "avg_pool2d": _pool(F.avg_pool2d),
    "adaptive_avg_pool2d": _adaptive,
    "flatten": lambda m, s, xs: torch.flatten(xs[0], 1),
    "add": lambda m, s, xs: functools.reduce(operator.add, xs),
    "dropout": lambda m, s, xs: F.dropout(xs[0], s.fields["p"], m.training),
}


def _new_layer(node, init: bool) -> nn.Module:
    f = node.fields
    make = nn.utils.skip_init if not init else lambda cls, *args, **kwargs: cls(*args, **kwargs)
    if node.op == "linear":
        return make(nn.Linear, f["in"], f["out"], bias=f["bias"])
    if node.op == "conv2d":
        return make(
            nn.Conv2d, f["in"], f["out"], f["kernel"], f["stride"], f["padding"], bias=f["bias"], groups=f["groups"]
        )
    norm = nn.BatchNorm1d if node.in_rank == 1 else nn.BatchNorm2d
    return make(norm, f["features"], eps=f["eps"], momentum=f["momentum"])


class ArchModule(nn.Module):
    """The module `module_from_arch` returns. `spec` is the spec it was built
    from; `arch_name` and `input_shape` are its `name` and `input`."""

    def __init__(self, plan: Plan, spec: dict, init: bool = True):
        super().__init__()
        self._nt_spec = spec
        self.arch_name = plan.name
        self.input_shape = plan.input
        for node in plan.nodes:
            if node.op in ("linear", "conv2d", "batch_norm"):
                self._place(node.name, _new_layer(node, init))
        slot = {MODEL_INPUT: 0}
        steps = []
        for k, i in enumerate(plan.order):
            node = plan.nodes[i]
            slot[i] = k + 1
            steps.append((node, tuple(slot[j] for j in node.inputs)))
        last_reader = {}
        for k, (_, reads) in enumerate(steps):
            for s in reads:
                last_reader[s] = k
        self._nt_steps = tuple(
            _Step(
                node.op,
                node.name,
                dict(node.fields),
                reads,
                tuple(sorted({s for s in reads if last_reader[s] == k})),
            )
            for k, (node, reads) in enumerate(steps)
        )
        self._nt_output = slot[plan.output]

    @property
    def spec(self) -> dict:
        return load_spec(self._nt_spec)

    def _place(self, name: str, layer: nn.Module) -> None:
        parent: nn.Module = self
        *path, leaf = name.split(".")
        try:
            for part in path:
                child = parent._modules.get(part)
                if child is None:
                    child = Group()
                    parent.add_module(part, child)
                parent = child
            old = parent._modules.get(leaf)
            if isinstance(old, Group):
                # `a.b` came before `a`: the layer takes over the group's children.
                for key, child in old._modules.items():
                    layer.add_module(key, child)
                parent._modules[leaf] = layer
            else:
                parent.add_module(leaf, layer)
        except (KeyError, TypeError) as e:
            raise SpecError(f"node `{name}` cannot be a PyTorch module path: {e}") from None

    def forward(self, x):
        values = [x] + [None] * len(self._nt_steps)
        for k, step in enumerate(self._nt_steps):
            xs = [values[s] for s in step.inputs]
            for s in step.release:
                if s != self._nt_output:
                    values[s] = None
            values[k + 1] = _APPLY[step.op](self, step, xs)
        return values[self._nt_output]

    def extra_repr(self) -> str:
        return f"arch={self.arch_name!r}, input={list(self.input_shape)}, nodes={len(self._nt_steps)}"


def module_from_arch(spec: Source, init: bool = True) -> ArchModule:
    """A PyTorch module for an nt.arch/v1 spec: a dict, JSON text, a JSON file
    or a checkpoint (`.safetensors`, whose `nt.arch` metadata holds the spec).

    Its state_dict names are the spec's parameter names, so
    `load_state_dict(safetensors.torch.load_file(path))` takes nt's
    checkpoints as they are. Layers start as PyTorch initialises them;
    `init=False` leaves their tensors uninitialised (`torch.empty`), which
    is faster when weights are loaded right after. Raises `SpecError` for an
    invalid spec."""
    spec = load_spec(spec)
    return ArchModule(resolve(spec), spec, init)
