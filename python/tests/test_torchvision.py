"""torchvision models (num_classes=10, 32x32 inputs) through arch_from_module
and back through module_from_arch: same state_dict names and shapes, same
logits with the torchvision weights, and a spec that survives JSON."""

import copy
import json

import pytest
import torch
import torchvision

from conftest import torchvision_import
from ntpy.arch import arch_from_module, module_from_arch, resolve

MODELS = ["resnet18", "resnet50", "vgg16_bn", "mobilenet_v2"]


@pytest.fixture(params=MODELS)
def imported(request):
    return torchvision_import(request.param)


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_parameter_names_are_the_state_dict_keys(imported):
    model, spec = imported
    assert resolve(spec).params() == list(model.state_dict())
    twin = module_from_arch(spec, init=False)
    assert shapes(twin) == shapes(model)


def test_the_spec_module_gives_the_models_logits(imported):
    model, spec = imported
    twin = module_from_arch(json.dumps(spec), init=False)
    twin.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    twin.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(x), twin(x)
    assert got.shape == (4, 10)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_the_spec_round_trips_through_json(imported):
    _, spec = imported
    text = json.dumps(spec)
    assert json.loads(text) == spec
    assert resolve(json.loads(text)) == resolve(spec)


def test_the_import_matches_torchvisions_structure(imported):
    _, spec = imported
    ops = [n["op"] for n in spec["nodes"]]
    assert spec["input"] == [3, 32, 32]
    assert spec["nodes"][-1]["op"] == "linear" and spec["nodes"][-1]["out"] == 10
    if spec["name"].startswith("resnet"):
        assert ops.count("add") == {"resnet18": 8, "resnet50": 16}[spec["name"]]
    if spec["name"] == "mobilenet_v2":
        depthwise = [n for n in spec["nodes"] if n.get("groups", 1) > 1]
        assert depthwise and all(n["groups"] == n["in"] == n["out"] for n in depthwise)
        assert "relu6" in ops
    if spec["name"] == "vgg16_bn":
        # AdaptiveAvgPool2d((7, 7)) on the 1x1 map a 32x32 input leaves.
        assert [n["output"] for n in spec["nodes"] if n["op"] == "adaptive_avg_pool2d"] == [7]


def test_training_mode_updates_the_same_statistics():
    cached, spec = torchvision_import("resnet18")
    model = copy.deepcopy(cached)
    twin = module_from_arch(spec, init=False)
    twin.load_state_dict(model.state_dict())
    model.train()
    twin.train()
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(twin(x), model(x), atol=1e-5)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_importing_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    arch_from_module(model, torch.randn(2, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
