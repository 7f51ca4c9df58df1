"""What nt.arch/v1 cannot express is an error that names what and where."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ntpy.arch import ArchError, SpecError, UnsupportedModule, arch_from_module, module_from_arch


class Wrap(nn.Module):
    """A model of one conv stem, then `tail` (a function of (self, x))."""

    def __init__(self, tail, **layers):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        for k, v in layers.items():
            setattr(self, k, v)
        self._tail = tail

    def forward(self, x):
        return self._tail(self, self.stem(x))


def fails(model, match, shape=(3, 8, 8), error=UnsupportedModule):
    with pytest.raises(error, match=match) as info:
        arch_from_module(model, torch.randn(2, *shape))
    return info.value


def test_an_unsupported_module_names_its_class_node_and_target():
    encoder = nn.Module()
    encoder.act = nn.PReLU()
    err = fails(
        Wrap(lambda s, x: s.encoder.act(x), encoder=encoder),
        re.escape("unsupported module torch.nn.PReLU at node `encoder_act` (target `encoder.act`"),
    )
    assert err.node == "encoder_act" and err.target == "encoder.act"


def test_an_lstm_is_named():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Module()
            self.encoder.lstm = nn.LSTM(8, 8)

        def forward(self, x):
            out, _ = self.encoder.lstm(x)
            return out

    fails(Seq(), re.escape("unsupported module torch.nn.LSTM at node `encoder_lstm` (target `encoder.lstm`"), (8,))


@pytest.mark.parametrize(
    "tail, function",
    [
        (lambda s, x: torch.cat([x, x], 1), "torch.cat"),
        (lambda s, x: x.mean((2, 3)), "Tensor.mean"),
        (lambda s, x: x.transpose(2, 3), "Tensor.transpose"),
        (lambda s, x: torch.matmul(x, x), "torch.matmul"),
        (lambda s, x: F.scaled_dot_product_attention(x, x, x), "torch.nn.functional.scaled_dot_product_attention"),
        (lambda s, x: x * 2, "operator.mul"),
    ],
    ids=["cat", "mean", "transpose", "matmul", "attention", "mul"],
)
def test_an_unsupported_function_names_itself_and_the_node(tail, function):
    err = fails(Wrap(tail), f"unsupported (function|method) {re.escape(function)}.* at node `")
    assert err.node and function.split(".")[-1] in err.target


def test_the_message_points_at_the_models_code():
    class Block(nn.Module):
        def forward(self, x):
            return torch.cat([x, x], 1)

    err = fails(Wrap(lambda s, x: s.block(x), block=Block()), "unsupported function torch.cat")
    assert "in module `block` (Block)" in str(err)
    assert "test_errors.py:" in str(err)


def test_data_dependent_control_flow_names_the_module():
    class Gate(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = Gate()

        def forward(self, x):
            return self.gate(x)

    err = fails(Net(), "branches on the values of its input")
    assert "`Net`" in str(err) and "module `gate` (Gate)" in str(err)
    assert "symbolically traced variables cannot be used as inputs to control flow" in str(err)


@pytest.mark.parametrize(
    "layer, match",
    [
        (nn.BatchNorm2d(4, affine=False), "affine=False"),
        (nn.BatchNorm2d(4, track_running_stats=False), "track_running_stats=False"),
        (nn.BatchNorm2d(4, momentum=None), "momentum=None"),
        (nn.Conv2d(4, 4, (3, 1)), r"non-square kernel \(3, 1\)"),
        (nn.Conv2d(4, 4, 3, stride=(1, 2)), r"non-square stride \(1, 2\)"),
        (nn.Conv2d(4, 4, 3, padding=(1, 0)), r"non-square padding \(1, 0\)"),
        (nn.Conv2d(4, 4, 3, dilation=2), r"dilation \(2, 2\)"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.Conv2d(4, 4, 2, padding="same"), "padding='same' and kernel 2"),
        (nn.MaxPool2d(2, ceil_mode=True), "ceil_mode=True"),
        (nn.MaxPool2d(3, dilation=2), "dilation"),
        (nn.AvgPool2d(2, ceil_mode=True), "ceil_mode=True"),
        (nn.AvgPool2d(3, padding=1, count_include_pad=False), "count_include_pad=False"),
        (nn.AvgPool2d(2, divisor_override=3), "divisor_override"),
        (nn.AdaptiveAvgPool2d((None, 2)), r"output size \(None, 2\)"),
        (nn.Flatten(2), "flatten\\(start_dim=2"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_a_layer_setting_without_an_nt_equivalent_names_the_node(layer, match):
    err = fails(Wrap(lambda s, x: s.layer(x), layer=layer), match)
    assert "at node `layer` (target `layer`" in str(err)


@pytest.mark.parametrize(
    "tail, match",
    [
        (lambda s, x: torch.flatten(x), r"flatten\(start_dim=0"),
        (lambda s, x: x.flatten(1, 2), r"flatten\(start_dim=1, end_dim=2"),
        (lambda s, x: F.adaptive_avg_pool2d(x, (2, None)), r"output size \(2, None\)"),
        (lambda s, x: F.max_pool2d(x, 2, ceil_mode=True), "ceil_mode=True"),
        (lambda s, x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), "count_include_pad=False"),
        (lambda s, x: x.view(2, -1), "view from .* is unsupported"),
        (lambda s, x: x.reshape(x.size(0), 4, -1), "reshape from .* is unsupported"),
        (lambda s, x: x + 1, "adding a constant"),
        (lambda s, x: x + x[:, :1], "unsupported function operator.getitem"),
        (lambda s, x: x + x.sum(1, keepdim=True).relu(), "unsupported method Tensor.sum"),
        (lambda s, x: torch.add(x, x, alpha=2), "alpha=2"),
        (lambda s, x: F.linear(x.flatten(1), s.w), "reading the tensor attribute directly .* at node `w`"),
        (lambda s, x: (x, x), "forward returns tuple"),
    ],
    ids=[
        "flatten-all", "flatten-middle", "adaptive-none", "max-ceil", "avg-count-pad", "view-fixed-batch",
        "reshape-3d", "add-constant", "slice", "sum", "alpha", "functional-linear", "tuple",
    ],
)
def test_a_function_without_an_nt_equivalent_names_the_node(tail, match):
    model = Wrap(tail, w=nn.Parameter(torch.zeros(2, 256)))
    err = fails(model, match)
    assert "node `" in str(err) or err.node


def test_a_broadcasting_add_is_refused():
    fails(Wrap(lambda s, x: x + F.adaptive_avg_pool2d(x, 1)), r"add of shapes \[2, 4, 8, 8\] and \[2, 4, 1, 1\]")


def test_a_linear_on_an_unflattened_input_is_refused():
    fails(Wrap(lambda s, x: s.fc(x), fc=nn.Linear(8, 2)), r"linear \(nt's takes \[batch, features\]\) on an input")


def test_a_layer_called_twice_is_refused():
    fails(
        Wrap(lambda s, x: s.conv(s.conv(x)), conv=nn.Conv2d(4, 4, 3, padding=1)),
        "module `conv` is called a second time \\(first at node `conv`\\)",
    )


def test_an_in_place_change_of_a_tensor_read_later_is_refused():
    def tail(s, x):
        y = s.act(x)  # changes x ...
        return y + x  # ... which the add reads after

    fails(Wrap(tail, act=nn.ReLU(inplace=True)), "in-place op that changes `stem`, which `add` reads afterwards")

    def statement(s, x):
        x.relu_()  # its result unused, x changed
        return s.fc(x.flatten(1))

    fails(Wrap(statement, fc=nn.Linear(256, 2)), "in-place op that changes `stem`")


def test_an_unused_layer_is_refused():
    err = fails(Wrap(lambda s, x: x.flatten(1), spare=nn.Linear(3, 3)), "`spare.bias`, `spare.weight`")
    assert "leads to the output" in str(err)


def test_a_second_input_is_refused():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, y):
            return self.fc(x + y)

    with pytest.raises(ArchError):
        arch_from_module(Two(), torch.randn(2, 4))


def test_an_example_of_the_wrong_rank_or_shape_is_refused():
    with pytest.raises(ArchError, match=r"\[N, features\] or \[N, C, H, W\], got \[2, 3, 8\]"):
        arch_from_module(Wrap(lambda s, x: x), torch.randn(2, 3, 8))
    with pytest.raises(ArchError, match="fails on an example input of shape \\[2, 1, 8, 8\\]"):
        arch_from_module(Wrap(lambda s, x: x.flatten(1)), torch.randn(2, 1, 8, 8))


def base_spec(**changes):
    spec = {
        "format": "nt.arch/v1",
        "name": "t",
        "input": [3, 4, 4],
        "nodes": [
            {"name": "conv", "op": "conv2d", "in": 3, "out": 2, "kernel": 3, "padding": 1},
            {"name": "relu", "op": "relu"},
            {"op": "flatten"},
            {"name": "fc", "op": "linear", "in": 32, "out": 2},
        ],
    }
    spec.update(changes)
    return spec


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s.update(format="nt.arch/v2"), "unsupported format `nt.arch/v2`"),
        (lambda s: s.update(extra=1), "unknown field `extra` in the spec"),
        (lambda s: s["nodes"][1].update(inplace=True), "node `relu`: unknown field `inplace` for op `relu`"),
        (lambda s: s["nodes"][1].update(op="transformer"), "node `relu`: unknown op `transformer`"),
        (lambda s: s["nodes"][3].pop("name"), "node 3 \\(linear\\) has parameters and needs a `name`"),
        (lambda s: s["nodes"][3].pop("out"), "node `fc` \\(linear\\): missing field `out`"),
        (lambda s: s["nodes"][3].update(bias="yes"), "`bias` must be true or false"),
        (lambda s: s["nodes"][1].update(input="nowhere"), "node `relu` reads `nowhere`, which is not a node name"),
        (lambda s: s["nodes"][0].update(input="fc"), "the nodes form a cycle"),
        (lambda s: s["nodes"][1].update(name="conv"), "nodes 0 and 1 are both named `conv`"),
        (lambda s: s["nodes"][1].update(name="input"), "cannot be a node name"),
        (lambda s: s.update(output="relu"), "nodes that do not lead to the output `relu`: #2, fc"),
        (lambda s: s["nodes"][2].update(input=["relu", "conv"]), "takes one input but has 2"),
        (lambda s: s["nodes"][0].update(groups=2), "groups 2 must divide `in` and `out`"),
        (lambda s: s["nodes"].pop(2), "node `fc` \\(linear\\) needs a flat \\[features\\] input"),
    ],
)
def test_a_malformed_spec_names_the_node_or_field(edit, match):
    spec = base_spec()
    edit(spec)
    with pytest.raises(SpecError, match=match):
        module_from_arch(spec)


def test_a_valid_base_spec_builds():
    assert module_from_arch(base_spec())(torch.randn(2, 3, 4, 4)).shape == (2, 2)


def test_unreadable_sources_are_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        module_from_arch(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(SpecError, match="is not JSON"):
        module_from_arch(str(tmp_path / "bad.json"))
    (tmp_path / "plain.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(SpecError, match="records no architecture"):
        module_from_arch(tmp_path / "plain.safetensors")
