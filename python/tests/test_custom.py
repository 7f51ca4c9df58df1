"""A model using every op, its round trip through the spec, and nt's own
checkpoints (the golden fixtures) in module_from_arch."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from models import Everything, Mlp, Upsampling
from ntpy.arch import arch_from_module, module_from_arch, resolve, verify


def import_model(model, shape, **kwargs):
    torch.manual_seed(0)
    return arch_from_module(model, torch.randn(2, *shape), **kwargs)


def randomise_statistics(model):
    """BatchNorm statistics away from 0 and 1, so eval mode really uses them."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize(
    "make, shape",
    [(Everything, (3, 16, 16)), (Upsampling, (3, 8, 8)), (Mlp, (12,))],
    ids=["everything", "upsampling", "mlp"],
)
def test_custom_models_round_trip(make, shape):
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        randomise_statistics(model)
    spec = import_model(model, shape)
    assert spec["input"] == list(shape)
    assert resolve(spec).params() == list(model.state_dict())
    twin = module_from_arch(json.loads(json.dumps(spec)))
    twin.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    twin.eval()
    x = torch.randn(5, *shape)
    with torch.no_grad():
        assert torch.allclose(twin(x), model(x), atol=1e-5)
    assert verify(model, spec, x) <= 1e-5


def test_every_op_is_imported_with_its_fields():
    spec = import_model(Everything(), (3, 16, 16), name="everything")
    assert spec["name"] == "everything"
    by_op = {}
    for node in spec["nodes"]:
        by_op.setdefault(node["op"], []).append(node)
    assert sorted(by_op) == sorted(
        [
            "conv2d", "batch_norm", "relu", "relu6", "hardswish", "add", "max_pool2d", "avg_pool2d",
            "leaky_relu", "hardtanh", "sigmoid", "tanh", "silu", "gelu", "adaptive_avg_pool2d", "flatten",
            "linear", "dropout",
        ]
    )
    names = {n["name"]: n for n in spec["nodes"]}
    assert names["blocks.0.depthwise"] == {
        "name": "blocks.0.depthwise", "op": "conv2d", "in": 8, "out": 8, "kernel": 3, "stride": 1,
        "padding": 1, "bias": True, "groups": 8,
    }
    assert names["blocks.0.bn1"]["eps"] == 1e-3 and names["blocks.0.bn1"]["momentum"] == 0.05
    assert by_op["max_pool2d"] == [{"name": "max_pool2d", "op": "max_pool2d", "kernel": 3, "stride": 2, "padding": 1}]
    assert by_op["avg_pool2d"][0]["kernel"] == 2 and "stride" not in by_op["avg_pool2d"][0]
    assert by_op["hardtanh"][0]["min"] == -2.0 and by_op["hardtanh"][0]["max"] == 2.0
    assert by_op["leaky_relu"][0]["slope"] == 0.2
    assert by_op["gelu"][0]["approximate"] == "tanh"
    assert [n["p"] for n in by_op["dropout"]] == [0.25, 0.1]
    # Both residual sums have three inputs; the Identity skip reads the block input.
    assert [len(n["input"]) for n in by_op["add"]] == [3, 3, 3]
    assert by_op["add"][0]["input"] == ["blocks.0.conv2", "relu", "blocks_0_act"]
    # Nodes that read the previous node leave `input` out; the others name it.
    assert "input" not in names["blocks.0.conv1"]
    assert names["sigmoid"]["input"] == "act" and names["tanh"]["input"] == "act"


def test_an_imported_spec_module_imports_to_the_same_spec():
    spec = import_model(Everything(), (3, 16, 16), name="everything")
    again = arch_from_module(module_from_arch(spec), torch.randn(2, 3, 16, 16), name="everything")

    def canonical(s):
        """Nodes by position: parameterless names differ between the two."""
        index = {n["name"]: i for i, n in enumerate(s["nodes"])}
        out = []
        for i, n in enumerate(s["nodes"]):
            src = n.get("input", s["nodes"][i - 1]["name"] if i else "input")
            src = [src] if isinstance(src, str) else src
            fields = {k: v for k, v in n.items() if k not in ("name", "input")}
            named = n["name"] if n["op"] in ("linear", "conv2d", "batch_norm") else None
            out.append((named, fields, [index.get(x, -1) for x in src]))
        return out

    assert canonical(again) == canonical(spec)


# nt's golden fixtures: the reference NT's fused checkpoints and its logits.
GOLDEN = {
    "mlp_k2": "golden-mlp.json",
    "mlp_bias_k4": "golden-mlp-bias.json",
    "lenet_k2": "golden-lenet.json",
    "vgg_bn_k2": "golden-vgg-bn.json",
    "resnet_mini_k2": "golden-resnet-mini.json",
}


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_nt_checkpoints_load_as_they_are(case):
    folder = os.path.join(REPO, "runtime", "tests", "golden", case)
    model = module_from_arch(os.path.join(REPO, "examples", "arch", GOLDEN[case]))
    model.load_state_dict(load_file(os.path.join(folder, "fused.safetensors")), strict=True)
    model.eval()
    io = load_file(os.path.join(folder, "io.safetensors"))
    with torch.no_grad():
        assert torch.allclose(model(io["input"]), io["fused_logits"], atol=1e-4)


def test_a_checkpoint_gives_its_own_architecture():
    path = os.path.join(REPO, "fuzz", "corpus", "checkpoint", "seed-mlp_k2-with-arch.safetensors")
    model = module_from_arch(path)
    assert model.arch_name == "golden-mlp"
    model.load_state_dict(load_file(path), strict=True)
    assert model(torch.randn(3, *model.input_shape)).shape == (3, 10)


def test_modes_switch_dropout_and_batch_norm():
    spec = import_model(Everything(), (3, 16, 16))
    model = module_from_arch(spec)
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    model.train()
    before = model.stem_bn.num_batches_tracked.item()
    torch.manual_seed(0)
    c = model(x)
    torch.manual_seed(1)
    d = model(x)
    assert model.stem_bn.num_batches_tracked.item() == before + 2
    assert not torch.allclose(c, d)  # dropout draws differ


def test_layers_live_at_their_dotted_paths():
    spec = import_model(Everything(), (3, 16, 16))
    model = module_from_arch(spec)
    assert isinstance(model.blocks[0].conv1, torch.nn.Conv2d)
    assert model.get_submodule("head.fc1") is model.head.fc1
    assert isinstance(model.head.bn, torch.nn.BatchNorm1d)
    assert isinstance(model.stem_bn, torch.nn.BatchNorm2d)
    assert model.spec == spec
