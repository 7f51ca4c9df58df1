"""The nt.arch/v1 format on the Python side: reading a spec (a dict, JSON
text, a JSON file or a checkpoint's `nt.arch` metadata) and resolving it,
once, into a `Plan` (defaults filled in, inputs resolved to node indices,
nodes in topological order) that the module builder reads.

The checks follow the Rust side (`fusion/src/arch/spec.rs`, `graph.rs`):
unknown fields, reserved or duplicate names, unknown inputs, wrong arity,
cycles and nodes that do not lead to the output are errors naming the node.
Shapes are checked by running the module (`python -m ntpy.arch module`).
"""

from __future__ import annotations

import copy
import heapq
import json
import os
from dataclasses import dataclass
from typing import Any, Union

from .errors import SpecError

FORMAT = "nt.arch/v1"

Source = Union[dict, str, "os.PathLike[str]"]

_REQUIRED = object()

# Each op's fields and their defaults (`_REQUIRED`: no default), in the order
# the Rust side writes them.
OPS: dict[str, dict[str, Any]] = {
    "linear": {"in": _REQUIRED, "out": _REQUIRED, "bias": True},
    "conv2d": {
        "in": _REQUIRED,
        "out": _REQUIRED,
        "kernel": _REQUIRED,
        "stride": 1,
        "padding": 0,
        "bias": True,
        "groups": 1,
    },
    "batch_norm": {"features": _REQUIRED, "eps": 1e-5, "momentum": 0.1},
    "relu": {},
    "relu6": {},
    "hardtanh": {"min": -1.0, "max": 1.0},
    "leaky_relu": {"slope": 0.01},
    "gelu": {"approximate": "none"},
    "silu": {},
    "hardswish": {},
    "sigmoid": {},
    "tanh": {},
    "max_pool2d": {"kernel": _REQUIRED, "stride": None, "padding": 0},
    "avg_pool2d": {"kernel": _REQUIRED, "stride": None, "padding": 0},
    "adaptive_avg_pool2d": {"output": 1},
    "flatten": {},
    "add": {},
    "dropout": {"p": _REQUIRED},
}

# Ops that own parameters: they need a name, their state_dict prefix.
PARAM_OPS = ("linear", "conv2d", "batch_norm")

# What each field holds.
_SIZES = {"in", "out", "kernel", "features", "groups", "stride"}
_COUNTS = {"padding"}
_BOOLS = {"bias"}
_NUMBERS = {"eps", "momentum", "min", "max", "slope", "p"}

MODEL_INPUT = -1  # the index standing for the model input in `PlanNode.inputs`


@dataclass(frozen=True)
class PlanNode:
    """One resolved node: every field present (pool strides resolved to the
    kernel), inputs as node indices (`MODEL_INPUT` for the model input)."""

    index: int
    name: str  # the spec's name, or `#<index>` for an unnamed node
    op: str
    fields: dict
    inputs: tuple
    in_rank: int  # rank of one input sample: 1 ([features]) or 3 ([C, H, W])


@dataclass(frozen=True)
class Plan:
    name: str
    input: tuple
    nodes: tuple  # PlanNode, in spec order
    order: tuple  # node indices, topological (ready nodes taken in spec order)
    output: int

    def params(self) -> list[str]:
        """The state_dict names of the model, in spec order."""
        names = []
        for node in self.nodes:
            names.extend(f"{node.name}.{p}" for p in param_suffixes(node.op, node.fields))
        return names


def param_suffixes(op: str, fields: dict) -> list[str]:
    """The state_dict attributes of one node (`weight`, `bias`, ...)."""
    if op in ("linear", "conv2d"):
        return ["weight", "bias"] if fields.get("bias", True) else ["weight"]
    if op == "batch_norm":
        return ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    return []


def load_spec(source: Source) -> dict:
    """A spec as a dict, from a dict (copied), JSON text, a JSON file, or a
    checkpoint (`.safetensors`) whose metadata records it under `nt.arch`."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    if isinstance(source, str) and source.lstrip().startswith("{"):
        return _parse(source, "the spec text")
    if not isinstance(source, (str, os.PathLike)):
        raise SpecError(f"a spec is a dict, JSON text or a path, got {type(source).__name__}")
    path = os.fspath(source)
    if path.endswith(".safetensors"):
        return _parse(checkpoint_metadata(path, "nt.arch"), f"`nt.arch` of {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SpecError(f"cannot read {path}: {e.strerror or e}") from None
    return _parse(text, path)


def checkpoint_metadata(path: str, key: str) -> str:
    """One metadata entry of a safetensors file, read from its header alone
    (8 bytes of header length, then the JSON header)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > 100 << 20:
                raise SpecError(f"{path} is not a safetensors file (header of {size} bytes)")
            header = json.loads(f.read(size))
    except OSError as e:
        raise SpecError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError):
        raise SpecError(f"{path} is not a safetensors file (its header is not JSON)") from None
    meta = (header.get("__metadata__") or {}) if isinstance(header, dict) else {}
    if key not in meta:
        raise SpecError(f"{path} records no architecture (no `{key}` in its metadata)")
    return meta[key]


def _parse(text: str, what: str) -> dict:
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise SpecError(f"{what} is not JSON: {e}") from None
    if not isinstance(spec, dict):
        raise SpecError(f"{what}: a spec is a JSON object, got {type(spec).__name__}")
    return spec


def resolve(source: Source) -> Plan:
    """Validates a spec and resolves it into a `Plan`."""
    spec = load_spec(source)
    unknown = set(spec) - {"format", "name", "input", "output", "nodes"}
    if unknown:
        raise SpecError(f"unknown field `{sorted(unknown)[0]}` in the spec")
    for key in ("format", "name", "input", "nodes"):
        if key not in spec:
            raise SpecError(f"missing field `{key}` in the spec")
    if spec["format"] != FORMAT:
        raise SpecError(f"unsupported format `{spec['format']}` (this version reads `{FORMAT}`)")
    if not isinstance(spec["name"], str):
        raise SpecError("`name` must be a string")
    shape = spec["input"]
    if (
        not isinstance(shape, list)
        or len(shape) not in (1, 3)
        or not all(_is_int(d) and d > 0 for d in shape)
    ):
        raise SpecError(
            f"`input` must be [features] or [channels, height, width] with non-zero sizes, got {shape}"
        )
    raw = spec["nodes"]
    if not isinstance(raw, list) or not raw:
        raise SpecError("`nodes` must be a non-empty list")

    names, ops, fields, wanted = [], [], [], []
    for i, node in enumerate(raw):
        if not isinstance(node, dict):
            raise SpecError(f"node {i} must be an object, got {node!r}")
        name, op, f, inputs = _node(i, node)
        names.append(name)
        ops.append(op)
        fields.append(f)
        wanted.append(inputs)
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in index:
            raise SpecError(f"nodes {index[name]} and {i} are both named `{name}`")
        index[name] = i

    inputs = []
    for i, want in enumerate(wanted):
        if not want:
            resolved = [MODEL_INPUT if i == 0 else i - 1]
        else:
            resolved = []
            for n in want:
                if n == "input":
                    resolved.append(MODEL_INPUT)
                elif n in index:
                    resolved.append(index[n])
                else:
                    raise SpecError(f"node `{names[i]}` reads `{n}`, which is not a node name")
        if (len(resolved) >= 2) != (ops[i] == "add"):
            takes = "two or more inputs" if ops[i] == "add" else "one input"
            raise SpecError(
                f"node `{names[i]}` ({ops[i]}) takes {takes} but has {len(resolved)} input(s)"
            )
        inputs.append(tuple(resolved))

    order = _topological_order(names, inputs)
    output = len(raw) - 1
    if spec.get("output") is not None:
        if spec["output"] not in index:
            raise SpecError(f"`output` names node `{spec['output']}`, which does not exist")
        output = index[spec["output"]]
    _check_all_used(names, inputs, output)

    ranks: dict[int, int] = {MODEL_INPUT: len(shape)}
    nodes: list[PlanNode | None] = [None] * len(raw)
    for i in order:
        in_rank = ranks[inputs[i][0]]
        ranks[i] = _out_rank(names[i], ops[i], in_rank)
        nodes[i] = PlanNode(i, names[i], ops[i], fields[i], inputs[i], in_rank)
    return Plan(spec["name"], tuple(shape), tuple(nodes), tuple(order), output)


def _node(i: int, node: dict):
    node = dict(node)
    name = node.pop("name", None)
    if name is not None:
        if not isinstance(name, str):
            raise SpecError(f"node {i}: `name` must be a string, got {name!r}")
        if not name or name == "input" or name.startswith("#") or any(c.isspace() for c in name):
            raise SpecError(
                f"node {i}: `{name}` cannot be a node name (empty, `input`, leading `#` and spaces are reserved)"
            )
    label = name if name is not None else f"#{i}"
    inputs = node.pop("input", None)
    if inputs is None:
        inputs = []
    elif isinstance(inputs, str):
        inputs = [inputs]
    elif not (isinstance(inputs, list) and all(isinstance(n, str) for n in inputs)):
        raise SpecError(f"node `{label}`: `input` must be a node name or a list of them, got {inputs!r}")
    op = node.pop("op", None)
    if op not in OPS:
        known = ", ".join(OPS)
        raise SpecError(
            f"node `{label}`: unknown op `{op}` (known: {known})"
            if op is not None
            else f"node `{label}`: missing field `op`"
        )
    if name is None and op in PARAM_OPS:
        raise SpecError(f"node {i} ({op}) has parameters and needs a `name` (its state_dict prefix)")
    schema = OPS[op]
    for key in node:
        if key not in schema:
            raise SpecError(f"node `{label}`: unknown field `{key}` for op `{op}`")
    fields = {}
    for key, default in schema.items():
        value = node.get(key, default)
        if value is _REQUIRED:
            raise SpecError(f"node `{label}` ({op}): missing field `{key}`")
        fields[key] = _check_field(label, op, key, value)
    if op in ("max_pool2d", "avg_pool2d") and fields["stride"] is None:
        fields["stride"] = fields["kernel"]
    if op == "conv2d" and (fields["in"] % fields["groups"] or fields["out"] % fields["groups"]):
        raise SpecError(f"node `{label}` (conv2d): groups {fields['groups']} must divide `in` and `out`")
    if op == "dropout" and not 0.0 <= fields["p"] < 1.0:
        raise SpecError(f"node `{label}` (dropout): p must be in [0, 1), got {fields['p']}")
    return label, op, fields, inputs


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_field(label: str, op: str, key: str, value):
    def bad(want: str):
        return SpecError(f"node `{label}` ({op}): `{key}` must be {want}, got {value!r}")

    if key == "stride" and value is None:
        return None
    if key in _SIZES:
        if not _is_int(value) or value < 1:
            raise bad("a positive integer")
    elif key in _COUNTS:
        if not _is_int(value) or value < 0:
            raise bad("a non-negative integer")
    elif key in _BOOLS:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif key in _NUMBERS:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad("a number")
        return float(value)
    elif key == "approximate":
        if value not in ("none", "tanh"):
            raise bad('"none" or "tanh"')
    elif key == "output":
        if _is_int(value) and value > 0:
            return value
        if isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value):
            return list(value)
        raise bad("a positive integer or [height, width]")
    return value


def _out_rank(name: str, op: str, rank: int) -> int:
    if op in ("conv2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d") and rank != 3:
        raise SpecError(f"node `{name}` ({op}) needs a [channels, height, width] input")
    if op == "linear" and rank != 1:
        raise SpecError(f"node `{name}` (linear) needs a flat [features] input (add a flatten node)")
    return 1 if op in ("linear", "flatten") else rank


def _topological_order(names: list, inputs: list) -> tuple:
    """Kahn's algorithm taking ready nodes in spec order, as the Rust side."""
    pending = [sum(1 for j in ins if j != MODEL_INPUT) for ins in inputs]
    readers: list[list[int]] = [[] for _ in names]
    for i, ins in enumerate(inputs):
        for j in ins:
            if j != MODEL_INPUT:
                readers[j].append(i)
    ready = [i for i, p in enumerate(pending) if p == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for r in readers[i]:
            pending[r] -= 1
            if pending[r] == 0:
                heapq.heappush(ready, r)
    if len(order) < len(names):
        stuck = [names[i] for i, p in enumerate(pending) if p > 0]
        raise SpecError(f"the nodes form a cycle: {' -> '.join(stuck)}")
    return tuple(order)


def _check_all_used(names: list, inputs: list, output: int) -> None:
    used = [False] * len(names)
    stack = [output]
    while stack:
        i = stack.pop()
        if used[i]:
            continue
        used[i] = True
        stack.extend(j for j in inputs[i] if j != MODEL_INPUT)
    unused = [n for n, u in zip(names, used) if not u]
    if unused:
        raise SpecError(f"nodes that do not lead to the output `{names[output]}`: {', '.join(unused)}")
