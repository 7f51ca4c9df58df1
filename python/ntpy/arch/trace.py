"""`arch_from_module`: an nt.arch/v1 spec for a PyTorch module, by tracing it
with torch.fx and running the graph once on an example input for shapes.

Layers with parameters become nodes named by their module path, so the
spec's parameter names are the module's state_dict keys; other ops take
the torch.fx node name. Anything nt.arch/v1 cannot express raises
`UnsupportedModule` naming it and the torch.fx node where it was met.
"""

from __future__ import annotations

import math
import operator
import os
import re
import traceback

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .errors import ArchError, UnsupportedModule
from .spec import FORMAT, param_suffixes

_TRACE_BRANCH = "symbolically traced variables cannot be used as inputs to control flow"


# ------------------------------------------------------------------ tracing


def _trace(module: nn.Module) -> torch.fx.GraphModule:
    tracer = torch.fx.Tracer()
    tracer.record_stack_traces = True
    cls = type(module).__name__
    try:
        graph = tracer.trace(module)
    except Exception as e:  # noqa: BLE001 - any failure of user code under tracing
        where = _user_frame(e.__traceback__, module)
        if _TRACE_BRANCH in str(e):
            raise UnsupportedModule(
                f"`{cls}`'s forward branches on the values of its input{where}: torch.fx "
                f'cannot trace that ("{_TRACE_BRANCH}"), and an nt.arch/v1 graph is the '
                "same for every input; remove the data-dependent `if`/`while` (or the "
                "Python loop over a tensor's values)"
            ) from None
        raise UnsupportedModule(f"torch.fx cannot trace `{cls}`{where}: {type(e).__name__}: {e}") from None
    return torch.fx.GraphModule(tracer.root, graph, cls)


def _user_frame(tb, root: nn.Module) -> str:
    """` (at file:line, in module `path` (Class))` for the innermost frame of
    the model's own code in a traceback, or '' when there is none."""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    found = None
    for frame, lineno in traceback.walk_tb(tb):
        path = frame.f_code.co_filename
        if not path.startswith(torch_dir) and not path.startswith(here):
            found = (frame, lineno)
    if found is None:
        return ""
    frame, lineno = found
    text = f" (at {frame.f_code.co_filename}:{lineno}"
    owner = frame.f_locals.get("self")
    if isinstance(owner, nn.Module):
        path = next((n for n, m in root.named_modules() if m is owner), None)
        where = f"module `{path}`" if path else "the model"
        text += f", in {where} ({type(owner).__name__})"
    return text + ")"


class _Shapes(torch.fx.Interpreter):
    """Runs the graph once and records each node's result: the shape of a
    tensor, the value of anything else (sizes, ints)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.info: dict = {}

    def run_node(self, n):
        try:
            result = super().run_node(n)
        except Exception as e:  # noqa: BLE001 - the example does not fit the model
            raise _Failure(n, e) from None
        if isinstance(result, torch.Tensor):
            self.info[n] = _Tensor(tuple(result.shape))
        else:
            self.info[n] = result
        return result


class _Failure(Exception):
    """A node that failed on the example (torch.fx adds its own context to the
    message of what the interpreter raises; this keeps the original)."""

    def __init__(self, node, error):
        super().__init__(str(error))
        self.node = node
        self.error = error


class _Tensor:
    """A traced tensor's shape (the example's, batch included)."""

    def __init__(self, shape):
        self.shape = shape

    def __repr__(self):
        return f"tensor{list(self.shape)}"


def _propagate(gm: torch.fx.GraphModule, example: torch.Tensor) -> dict:
    """Each node's result on the example, in eval mode and without grad, so
    running it changes nothing (BatchNorm statistics) in the user's module."""
    modes = [(m, m.training) for m in gm.modules()]
    gm.eval()
    interp = _Shapes(gm)
    try:
        with torch.no_grad():
            interp.run(example)
    except _Failure as f:
        first = str(f.error.args[0]) if f.error.args else str(f.error)
        raise ArchError(
            f"the model fails on an example input of shape {list(example.shape)} at node `{f.node.name}`: "
            f"{type(f.error).__name__}: {first.strip()}"
        ) from None
    finally:
        for m, mode in modes:
            m.train(mode)
    return interp.info


# ------------------------------------------------------------------ conversion


class _Convert:
    """One conversion: walks the traced graph and collects spec nodes."""

    def __init__(self, gm: torch.fx.GraphModule, info: dict, traced_training: bool):
        self.gm = gm
        self.traced_training = traced_training
        self.info = info
        self.modules = dict(gm.named_modules())
        self.nodes: list[dict] = []  # spec nodes, in graph order
        self.sources: dict = {}  # fx node -> spec name, or "input"
        self.by_name: dict[str, dict] = {}
        self.fx_of: dict[str, torch.fx.Node] = {}  # spec name -> the fx node that made it
        # Layers keep their module paths; other nodes take torch.fx names,
        # made unique against those paths.
        self.used = {name for name, m in self.modules.items() if type(m) in _LAYERS}
        self.layer_at: dict[str, str] = {}  # module path -> the fx node that called it

    # -- errors and small helpers

    def where(self, n) -> str:
        target = n.target if n.op == "call_module" else _describe(n)
        text = f"at node `{n.name}` (target `{target}`"
        stack = n.meta.get("nn_module_stack") or {}
        if n.op != "call_module" and stack:
            path, cls = list(stack.values())[-1]
            text += f", in module `{path}` ({getattr(cls, '__name__', cls)})"
        line = _line_of(n)
        if line:
            text += f", {line}"
        return text + ")"

    def fail(self, n, what: str) -> UnsupportedModule:
        target = n.target if n.op == "call_module" else _describe(n)
        return UnsupportedModule(f"{what} {self.where(n)}", node=n.name, target=str(target))

    def shape(self, n) -> tuple:
        v = self.info.get(n)
        return v.shape if isinstance(v, _Tensor) else ()

    def source(self, n, arg) -> str:
        if not isinstance(arg, torch.fx.Node) or not isinstance(self.info.get(arg), _Tensor):
            raise self.fail(n, f"an input that is not a tensor of the graph ({arg!r}) is unsupported")
        if arg not in self.sources:
            raise self.fail(n, f"reading `{arg.name}` is unsupported")
        return self.sources[arg]

    def const(self, n, value, what: str):
        if isinstance(value, torch.fx.Node) or isinstance(value, (list, tuple)) and any(
            isinstance(v, torch.fx.Node) for v in value
        ):
            raise self.fail(n, f"`{what}` computed in the graph is unsupported")
        return value

    def unique(self, name: str) -> str:
        base, k = name, 0
        while name in self.used or name == "input":
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def emit(self, n, name: str, op: str, fields: dict, inputs: list[str]) -> None:
        spec = {"name": name, "input": inputs, "op": op, **fields}
        self.nodes.append(spec)
        self.by_name[name] = spec
        self.fx_of[name] = n
        self.sources[n] = name

    # -- the walk

    def run(self) -> str:
        graph = list(self.gm.graph.nodes)
        live = _live(graph)
        self.check_in_place(graph)
        placeholders = [n for n in graph if n.op == "placeholder"]
        for n in graph:
            if n not in live:
                continue
            if n.op == "placeholder":
                if n is not placeholders[0]:
                    raise self.fail(n, "a second input of forward is unsupported (nt models take one tensor)")
                self.sources[n] = "input"
            elif n.op == "output":
                out = n.args[0]
                if not isinstance(out, torch.fx.Node) or not isinstance(self.info.get(out), _Tensor):
                    raise UnsupportedModule(
                        f"forward returns {type(self.info.get(out, out)).__name__}, not one tensor: "
                        "an nt model's output is the logits",
                        node=n.name,
                        target="output",
                    )
                return self.source(n, out)
            elif not isinstance(self.info.get(n), _Tensor):
                self.meta_value(n)
            elif n.op == "get_attr":
                raise self.fail(n, "reading the tensor attribute directly (outside a supported layer) is unsupported")
            elif n.op == "call_module":
                self.call_module(n)
            else:
                self.call_function(n)
        raise ArchError("the traced graph has no output")  # torch.fx always adds one

    def meta_value(self, n) -> None:
        """Sizes and other plain values (`x.size(0)` for a view): they make no node."""
        if n.op == "call_method" and n.target in ("size", "dim", "numel"):
            return
        if n.op == "call_function" and n.target is getattr and n.args[1] in ("shape", "ndim"):
            return
        if n.op == "call_function" and all(not isinstance(self.info.get(a), _Tensor) for a in n.all_input_nodes):
            return  # arithmetic on sizes
        if n.op == "call_module":
            raise self.fail(n, f"unsupported module {_class_name(self.modules[n.target])}")
        raise self.fail(n, f"unsupported {_kind(n)} {_describe(n)} (its result is not a tensor)")

    def check_in_place(self, graph: list) -> None:
        """An in-place op whose operand is read again afterwards: the spec's ops
        are out of place, so that later reader would see different values."""
        position = {n: i for i, n in enumerate(graph)}
        for n in graph:
            if not self.is_in_place(n) or not n.args or not isinstance(n.args[0], torch.fx.Node):
                continue
            operand = n.args[0]
            # Reading a size afterwards is fine: only values change.
            later = [
                u
                for u in operand.users
                if u is not n and position[u] > position[n] and isinstance(self.info.get(u), _Tensor)
            ]
            if later:
                reader = later[0].name
                raise self.fail(
                    n,
                    f"an in-place op that changes `{operand.name}`, which `{reader}` reads afterwards, "
                    "is unsupported (spec ops are out of place; drop `inplace=True` there)",
                )

    def is_in_place(self, n) -> bool:
        if n.op == "call_module":
            return bool(getattr(self.modules.get(n.target), "inplace", False))
        if n.op == "call_method":
            return n.target.endswith("_") and not n.target.endswith("__")
        if n.op == "call_function":
            if n.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
                return True
            name = getattr(n.target, "__name__", "")
            return bool(n.kwargs.get("inplace")) or (name.endswith("_") and not name.endswith("__"))
        return False

    # -- modules

    def call_module(self, n) -> None:
        m = self.modules[n.target]
        handler = _MODULES.get(type(m))
        if handler is None:
            raise self.fail(n, f"unsupported module {_class_name(m)}")
        if type(m) in _LAYERS:
            if n.target in self.layer_at:
                raise self.fail(
                    n,
                    f"module `{n.target}` is called a second time (first at node `{self.layer_at[n.target]}`): "
                    "nt.arch/v1 gives every layer its own parameters, so shared layers are unsupported",
                )
            self.layer_at[n.target] = n.name
            if n.target == "input" or n.target.startswith("#") or any(c.isspace() for c in n.target):
                raise self.fail(n, f"a layer named `{n.target}` is unsupported (the name is reserved in nt.arch/v1)")
        handler(self, n, m)

    def layer(self, n, op: str, fields: dict) -> None:
        self.emit(n, n.target, op, fields, [self.source(n, n.args[0])])

    def simple(self, n, op: str, fields: dict | None = None, x=None) -> None:
        x = n.args[0] if x is None else x
        self.emit(n, self.unique(n.name), op, fields or {}, [self.source(n, x)])

    def alias(self, n, x) -> None:
        self.sources[n] = self.source(n, x)

    def need_rank(self, n, x, ranks: tuple, what: str) -> tuple:
        shape = self.shape(x)
        if len(shape) not in ranks:
            raise self.fail(n, f"{what} on an input of shape {list(shape)} is unsupported")
        return shape

    # -- functions and methods

    def call_function(self, n) -> None:
        if n.op == "call_method":
            handler = _METHODS.get(n.target)
        else:
            handler = _FUNCTIONS.get(n.target)
        if handler is None:
            raise self.fail(n, f"unsupported {_kind(n)} {_describe(n)}")
        handler(self, n, _Args(self, n))

    def add(self, n, a, b, alpha=1) -> None:
        if self.const(n, alpha, "alpha") != 1:
            raise self.fail(n, f"add with alpha={alpha} is unsupported")
        for operand in (a, b):
            if not isinstance(operand, torch.fx.Node) or not isinstance(self.info.get(operand), _Tensor):
                raise self.fail(n, f"adding a constant ({operand!r}) is unsupported (add sums tensors of the graph)")
        if self.shape(a) != self.shape(b):
            raise self.fail(
                n, f"add of shapes {list(self.shape(a))} and {list(self.shape(b))} (broadcasting) is unsupported"
            )
        inputs = []
        for operand in (a, b):
            name = self.source(n, operand)
            spec = self.by_name.get(name)
            # `a + b + c`: an add read only by this one joins it.
            if spec is not None and spec["op"] == "add" and self.fx_of[name] is operand and len(operand.users) == 1:
                self.nodes.remove(spec)
                del self.by_name[name]
                inputs.extend(spec["input"])
            else:
                inputs.append(name)
        self.emit(n, self.unique(n.name), "add", {}, inputs)

    def flatten(self, n, x, start_dim=0, end_dim=-1) -> None:
        rank = len(self.shape(x))
        start, end = self.const(n, start_dim, "start_dim"), self.const(n, end_dim, "end_dim")
        if start != 1 or end not in (-1, rank - 1):
            raise self.fail(
                n, f"flatten(start_dim={start}, end_dim={end}) is unsupported (nt's flatten is torch.flatten(x, 1))"
            )
        self.need_rank(n, x, (2, 4), "flatten")
        self.simple(n, "flatten", x=x)

    def view(self, n, x, dims) -> None:
        """`x.view(x.size(0), -1)`, `x.reshape(-1, C*H*W)` and the like: a flatten."""
        shape = self.shape(x)
        dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else list(dims)
        out = self.shape(n)
        is_flatten = (
            len(shape) in (2, 4)
            and len(dims) == 2
            and out == (shape[0], math.prod(shape[1:]))
            and (
                dims[0] == -1  # the batch inferred, the features given
                or isinstance(dims[0], torch.fx.Node)  # the batch read from a size
            )
        )
        if not is_flatten:
            raise self.fail(
                n,
                f"{n.target} from {list(shape)} to {list(out)} is unsupported: only a flatten of every "
                "dimension after the batch (`x.view(x.size(0), -1)`) has an nt op",
            )
        self.simple(n, "flatten", x=x)


def _live(graph: list) -> set:
    """Nodes the output depends on."""
    live = set()
    stack = [n for n in graph if n.op == "output"]
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack.extend(n.all_input_nodes)
    return live


def _kind(n) -> str:
    return "method" if n.op == "call_method" else "function"


def _describe(n) -> str:
    """`torch.cat`, `torch.nn.functional.relu`, `Tensor.view`, `operator.mul`."""
    if n.op == "call_method":
        return f"Tensor.{n.target}"
    if n.op == "get_attr":
        return str(n.target)
    target = n.target
    name = getattr(target, "__name__", None)
    if name:
        for prefix, where in (("torch.nn.functional", F), ("torch", torch), ("operator", operator)):
            if getattr(where, name, None) is target:
                return f"{prefix}.{name}"
    try:
        return torch.fx.node._get_qualified_name(target)
    except Exception:  # noqa: BLE001 - only for the message
        return repr(target)


def _class_name(m: nn.Module) -> str:
    cls = type(m)
    if getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _line_of(n) -> str:
    """`file.py:12` of the call in the model's code (the innermost frame of
    torch.fx's stack trace outside torch)."""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    found = [
        (path, line)
        for path, line in re.findall(r'File "([^"]+)", line (\d+)', n.stack_trace or "")
        if not path.startswith(torch_dir)
    ]
    return f"{found[-1][0]}:{found[-1][1]}" if found else ""


class _Args:
    """A call's arguments bound to parameter names, for functions torch.fx
    records with positional and keyword arguments mixed."""

    def __init__(self, conv: _Convert, n):
        self.conv = conv
        self.n = n

    def bind(self, *params):
        """The arguments by name. `params` are names, in order; an optional
        one is a (name, default) tuple."""
        n = self.n
        names = [p if isinstance(p, str) else p[0] for p in params]
        if len(n.args) > len(names):
            raise self.conv.fail(n, f"{_describe(n)} with {len(n.args)} positional arguments is unsupported")
        bound = dict(zip(names, n.args))
        for key, value in n.kwargs.items():
            if key not in names:
                raise self.conv.fail(n, f"{_describe(n)} with argument `{key}` is unsupported")
            bound[key] = value
        for p in params:
            if not isinstance(p, str) and p[0] not in bound:
                bound[p[0]] = p[1]
        missing = [name for name in names if name not in bound]
        if missing:
            raise self.conv.fail(n, f"{_describe(n)} without `{missing[0]}` is unsupported")
        return bound


# ------------------------------------------------------------------ the mapping


def _square(conv: _Convert, n, value, what: str) -> int:
    value = conv.const(n, value, what)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise conv.fail(n, f"a non-square {what} {tuple(value)} is unsupported (nt.arch/v1 uses square ones)")
        value = value[0]
    return int(value)


def _conv2d(conv: _Convert, n, m: nn.Conv2d) -> None:
    conv.need_rank(n, n.args[0], (4,), "conv2d")
    if m.padding_mode != "zeros":
        raise conv.fail(n, f"conv2d with padding_mode={m.padding_mode!r} is unsupported (only zeros)")
    if any(d != 1 for d in m.dilation):
        raise conv.fail(n, f"conv2d with dilation {tuple(m.dilation)} is unsupported (only 1)")
    kernel = _square(conv, n, m.kernel_size, "kernel")
    padding = m.padding
    if isinstance(padding, str):
        # 'valid' is 0; 'same' with an odd kernel pads (k - 1) / 2 on every side.
        if padding == "valid":
            padding = 0
        elif padding == "same" and kernel % 2 == 1:
            padding = (kernel - 1) // 2
        else:
            raise conv.fail(
                n, f"conv2d with padding={padding!r} and kernel {kernel} is unsupported (it pads unevenly)"
            )
    fields = {
        "in": m.in_channels,
        "out": m.out_channels,
        "kernel": kernel,
        "stride": _square(conv, n, m.stride, "stride"),
        "padding": _square(conv, n, padding, "padding"),
        "bias": m.bias is not None,
    }
    if m.groups != 1:
        fields["groups"] = m.groups
    conv.layer(n, "conv2d", fields)


def _linear(conv: _Convert, n, m: nn.Linear) -> None:
    conv.need_rank(n, n.args[0], (2,), "linear (nt's takes [batch, features])")
    conv.layer(n, "linear", {"in": m.in_features, "out": m.out_features, "bias": m.bias is not None})


def _batch_norm(conv: _Convert, n, m) -> None:
    if not m.affine:
        raise conv.fail(n, f"{_class_name(m)} with affine=False is unsupported (nt's batch_norm has weight and bias)")
    if not m.track_running_stats:
        raise conv.fail(n, f"{_class_name(m)} with track_running_stats=False is unsupported")
    if m.momentum is None:
        raise conv.fail(n, f"{_class_name(m)} with momentum=None (a cumulative average) is unsupported")
    ranks = (2,) if isinstance(m, nn.BatchNorm1d) else (4,)
    conv.need_rank(n, n.args[0], ranks, _class_name(m))
    conv.layer(n, "batch_norm", {"features": m.num_features, "eps": m.eps, "momentum": m.momentum})


def _pool_fields(conv: _Convert, n, x, kernel, stride, padding) -> dict:
    conv.need_rank(n, x, (4,), "pooling")
    k = _square(conv, n, kernel, "kernel")
    s = k if stride is None or stride == [] or stride == () else _square(conv, n, stride, "stride")
    fields = {"kernel": k}
    if s != k:
        fields["stride"] = s
    fields["padding"] = _square(conv, n, padding, "padding")
    return fields


def _max_pool(conv: _Convert, n, x, kernel, stride, padding, dilation, ceil_mode, return_indices) -> None:
    if _square(conv, n, dilation, "dilation") != 1:
        raise conv.fail(n, f"max_pool2d with dilation {dilation} is unsupported (only 1)")
    if conv.const(n, ceil_mode, "ceil_mode"):
        raise conv.fail(n, "max_pool2d with ceil_mode=True is unsupported")
    if conv.const(n, return_indices, "return_indices"):
        raise conv.fail(n, "max_pool2d with return_indices=True is unsupported")
    conv.simple(n, "max_pool2d", _pool_fields(conv, n, x, kernel, stride, padding), x)


def _avg_pool(conv: _Convert, n, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override) -> None:
    if conv.const(n, ceil_mode, "ceil_mode"):
        raise conv.fail(n, "avg_pool2d with ceil_mode=True is unsupported")
    if not conv.const(n, count_include_pad, "count_include_pad"):
        raise conv.fail(n, "avg_pool2d with count_include_pad=False is unsupported")
    if conv.const(n, divisor_override, "divisor_override") is not None:
        raise conv.fail(n, "avg_pool2d with divisor_override is unsupported")
    conv.simple(n, "avg_pool2d", _pool_fields(conv, n, x, kernel, stride, padding), x)


def _adaptive(conv: _Convert, n, x, output) -> None:
    conv.need_rank(n, x, (4,), "adaptive_avg_pool2d")
    output = conv.const(n, output, "output_size")
    hw = list(output) if isinstance(output, (list, tuple)) else [output, output]
    if len(hw) != 2 or any(v is None for v in hw):
        raise conv.fail(n, f"adaptive_avg_pool2d with output size {output!r} is unsupported (None keeps a size)")
    conv.simple(n, "adaptive_avg_pool2d", {"output": hw[0] if hw[0] == hw[1] else hw}, x)


def _dropout(conv: _Convert, n, x, p) -> None:
    conv.simple(n, "dropout", {"p": float(conv.const(n, p, "p"))}, x)


def _hardtanh(conv: _Convert, n, lo, hi) -> None:
    conv.simple(n, "hardtanh", {"min": float(conv.const(n, lo, "min_val")), "max": float(conv.const(n, hi, "max_val"))})


def _leaky(conv: _Convert, n, slope) -> None:
    conv.simple(n, "leaky_relu", {"slope": float(conv.const(n, slope, "negative_slope"))})


def _gelu(conv: _Convert, n, approximate) -> None:
    conv.simple(n, "gelu", {"approximate": conv.const(n, approximate, "approximate")})


def _flatten_module(conv: _Convert, n, m: nn.Flatten) -> None:
    conv.flatten(n, n.args[0], m.start_dim, m.end_dim)


def _elementwise(op: str):
    return lambda conv, n, m: conv.simple(n, op)


_LAYERS = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)

# Modules by exact class: a subclass may change forward (torch.fx traces
# through the subclasses it does not treat as leaves anyway).
_MODULES = {
    nn.Linear: _linear,
    nn.Conv2d: _conv2d,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.ReLU: _elementwise("relu"),
    nn.ReLU6: _elementwise("relu6"),
    nn.Hardtanh: lambda c, n, m: _hardtanh(c, n, m.min_val, m.max_val),
    nn.LeakyReLU: lambda c, n, m: _leaky(c, n, m.negative_slope),
    nn.GELU: lambda c, n, m: _gelu(c, n, m.approximate),
    nn.SiLU: _elementwise("silu"),
    nn.Hardswish: _elementwise("hardswish"),
    nn.Sigmoid: _elementwise("sigmoid"),
    nn.Tanh: _elementwise("tanh"),
    nn.MaxPool2d: lambda c, n, m: _max_pool(
        c, n, n.args[0], m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices
    ),
    nn.AvgPool2d: lambda c, n, m: _avg_pool(
        c, n, n.args[0], m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override
    ),
    nn.AdaptiveAvgPool2d: lambda c, n, m: _adaptive(c, n, n.args[0], m.output_size),
    nn.Flatten: _flatten_module,
    nn.Dropout: lambda c, n, m: _dropout(c, n, n.args[0], m.p),
    nn.Identity: lambda c, n, m: c.alias(n, n.args[0]),
}


def _unary(op: str, *extra):
    """A function of one tensor whose other arguments (`inplace`, ...) do not matter."""

    def handle(conv, n, args):
        conv.simple(n, op, x=args.bind("input", *[(e, None) for e in extra])["input"])

    return handle


def _fn_max_pool(conv, n, args):
    a = args.bind(
        "input", "kernel_size", ("stride", None), ("padding", 0), ("dilation", 1), ("ceil_mode", False),
        ("return_indices", False),
    )
    _max_pool(conv, n, a["input"], a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"], a["return_indices"])


def _fn_avg_pool(conv, n, args):
    a = args.bind(
        "input", "kernel_size", ("stride", None), ("padding", 0), ("ceil_mode", False), ("count_include_pad", True),
        ("divisor_override", None),
    )
    _avg_pool(
        conv, n, a["input"], a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"],
        a["divisor_override"],
    )


def _fn_add(conv, n, args):
    a = args.bind("input", "other", ("alpha", 1))
    conv.add(n, a["input"], a["other"], a["alpha"])


def _fn_flatten(conv, n, args):
    a = args.bind("input", ("start_dim", 0), ("end_dim", -1))
    conv.flatten(n, a["input"], a["start_dim"], a["end_dim"])


def _fn_reshape(conv, n, args):
    a = args.bind("input", "shape")
    conv.view(n, a["input"], [a["shape"]])


def _method_view(conv, n, args):
    if n.kwargs:
        raise conv.fail(n, f"{_describe(n)} with keyword arguments is unsupported")
    conv.view(n, n.args[0], list(n.args[1:]))


def _fn_dropout(conv, n, args):
    a = args.bind("input", ("p", 0.5), ("training", True), ("inplace", False))
    # `training=self.training` is recorded as the mode at tracing time: a
    # False from a module traced in eval mode is taken to be that.
    if conv.const(n, a["training"], "training") is False and conv.traced_training:
        conv.alias(n, a["input"])  # `training=False` written out: the identity
    else:
        _dropout(conv, n, a["input"], a["p"])


_FUNCTIONS = {
    F.relu: _unary("relu", "inplace"),
    torch.relu: _unary("relu"),
    torch.relu_: _unary("relu"),
    F.relu_: _unary("relu"),
    F.relu6: _unary("relu6", "inplace"),
    F.hardtanh: lambda c, n, a: (
        lambda b: _hardtanh(c, n, b["min_val"], b["max_val"])
    )(a.bind("input", ("min_val", -1.0), ("max_val", 1.0), ("inplace", False))),
    F.leaky_relu: lambda c, n, a: (
        lambda b: _leaky(c, n, b["negative_slope"])
    )(a.bind("input", ("negative_slope", 0.01), ("inplace", False))),
    F.gelu: lambda c, n, a: (lambda b: _gelu(c, n, b["approximate"]))(a.bind("input", ("approximate", "none"))),
    F.silu: _unary("silu", "inplace"),
    F.hardswish: _unary("hardswish", "inplace"),
    torch.sigmoid: _unary("sigmoid"),
    F.sigmoid: _unary("sigmoid"),
    torch.tanh: _unary("tanh"),
    F.tanh: _unary("tanh"),
    F.max_pool2d: _fn_max_pool,
    torch.max_pool2d: _fn_max_pool,
    F.avg_pool2d: _fn_avg_pool,
    F.adaptive_avg_pool2d: lambda c, n, a: (lambda b: _adaptive(c, n, b["input"], b["output_size"]))(
        a.bind("input", "output_size")
    ),
    torch.flatten: _fn_flatten,
    torch.reshape: _fn_reshape,
    operator.add: _fn_add,
    operator.iadd: _fn_add,
    torch.add: _fn_add,
    F.dropout: _fn_dropout,
}

_METHODS = {
    "relu": _unary("relu"),
    "relu_": _unary("relu"),
    "sigmoid": _unary("sigmoid"),
    "sigmoid_": _unary("sigmoid"),
    "tanh": _unary("tanh"),
    "tanh_": _unary("tanh"),
    "add": _fn_add,
    "add_": _fn_add,
    "flatten": _fn_flatten,
    "view": _method_view,
    "reshape": _method_view,
    "contiguous": lambda c, n, a: c.alias(n, a.bind("input")["input"]),
}


# ------------------------------------------------------------------ the API


def arch_from_module(module: nn.Module, example_input: torch.Tensor, name: str | None = None) -> dict:
    """The nt.arch/v1 spec of `module`, traced with torch.fx and run once on
    `example_input` (a batch: [N, features] or [N, C, H, W]; the spec's
    `input` is its shape without the batch).

    Layers are named by their module path, so the spec's parameter names are
    `module.state_dict()`'s keys. Raises `UnsupportedModule` naming the layer
    or function and the torch.fx node for anything nt.arch/v1 cannot express.
    The module's weights and BatchNorm statistics are left as they were."""
    if not isinstance(module, nn.Module):
        raise ArchError(f"arch_from_module takes an nn.Module, got {type(module).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() not in (2, 4):
        shape = list(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input).__name__
        raise ArchError(
            f"the example input must be a batch of shape [N, features] or [N, C, H, W], got {shape}"
        )
    gm = _trace(module)
    info = _propagate(gm, example_input)
    conv = _Convert(gm, info, module.training)
    output = conv.run()
    if output == "input":
        raise UnsupportedModule("the model returns its input unchanged: there is no node to write")
    nodes = conv.nodes
    previous = "input"
    for node in nodes:
        inputs = node.pop("input")
        if inputs != [previous]:
            node["input"] = inputs[0] if len(inputs) == 1 else inputs
        # `input` goes after `name`, as the Rust side writes it.
        ordered = {"name": node.pop("name")}
        if "input" in node:
            ordered["input"] = node.pop("input")
        ordered.update(node)
        node.clear()
        node.update(ordered)
        previous = node["name"]
    spec = {
        "format": FORMAT,
        "name": name if name is not None else type(module).__name__,
        "input": list(example_input.shape[1:]),
    }
    if output != nodes[-1]["name"]:
        spec["output"] = output
    spec["nodes"] = nodes
    _check_state_dict(spec, module)
    return spec


def _check_state_dict(spec: dict, module: nn.Module) -> None:
    """The spec's parameter names must be the module's state_dict keys."""
    names = {
        f"{node['name']}.{p}" for node in spec["nodes"] for p in param_suffixes(node["op"], node)
    }
    keys = set(module.state_dict())
    extra = sorted(keys - names)
    if extra:
        shown = ", ".join(f"`{k}`" for k in extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise UnsupportedModule(
            f"the state_dict entries {shown} belong to no layer that leads to the output "
            "(an unused layer or a buffer outside the supported layers); nt.arch/v1 cannot carry them"
        )
    missing = sorted(names - keys)
    if missing:  # a layer's parameter that is not in the state_dict (a bug here)
        raise ArchError(f"the spec names parameters the module does not have: {', '.join(missing)}")


def verify(module: nn.Module, spec: dict, example_input: torch.Tensor, atol: float = 1e-5) -> float:
    """Checks that `module_from_arch(spec)` with `module`'s weights computes
    what `module` does on `example_input`, both in eval mode; returns the
    largest absolute difference, and raises `ArchError` past `atol` (plus
    1e-5 of the logits' size). Both modules' modes are restored."""
    from .build import module_from_arch

    twin = module_from_arch(spec)
    twin.load_state_dict(module.state_dict())
    twin.to(example_input.device)
    mode = module.training
    module.eval()
    twin.eval()
    try:
        with torch.no_grad():
            want = module(example_input)
            got = twin(example_input)
    finally:
        module.train(mode)
    if got.shape != want.shape:
        raise ArchError(f"the spec's module outputs {list(got.shape)}, the model {list(want.shape)}")
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    limit = atol + 1e-5 * want.abs().max().item() if want.numel() else atol
    if not diff <= limit:
        raise ArchError(
            f"the spec's module differs from the model by {diff:.3g} (allowed {limit:.3g}) on the example "
            "input: something in the forward that torch.fx does not see (an in-place change of a tensor "
            "read elsewhere, a mode-dependent branch) has no spec equivalent"
        )
    return diff
