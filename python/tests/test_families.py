"""torchvision's families through nt, as a user brings them: import the
model, make K members, fuse them with NT (the exactness guard on), and load
the fused checkpoint back into the torchvision model itself and into
module_from_arch, whose logits must be the ones `ntctl eval --inputs`
computes. Also: NT on MobileNetV2 (depthwise convolutions) equals the
reference approach, the dense concatenation pruned by torch-pruning 1.3.7.

VGG16-BN keeps torchvision's features and 7x7 average pool but gets a
64-64 classifier: torchvision's 4096-4096 one alone would be 1.6 GB for
three members, and the layers it would exercise are the same."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import REPO
from ntpy.arch import arch_from_module, module_from_arch

NTCTL = os.environ.get("NTCTL", os.path.join(REPO, "target", "debug", "ntctl"))


def ntctl(*args):
    if not os.access(NTCTL, os.X_OK):
        pytest.fail(f"no ntctl binary at {NTCTL}: build it with `cargo build -p ntctl` (or set NTCTL)")
    return subprocess.run([NTCTL, *args], capture_output=True, text=True, timeout=600)


def build(name, seed):
    torch.manual_seed(seed)
    if name == "vgg16_bn":
        model = torchvision.models.vgg16_bn(num_classes=10, init_weights=False)
        model.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(),
            nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(),
            nn.Linear(64, 10),
        )
    else:
        model = getattr(torchvision.models, name)(num_classes=10)
    # Members that differ in their BatchNorms too, as trained ones do.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def save_members(name, k, spec, folder):
    files = []
    for i in range(k):
        state = {n: t.contiguous() for n, t in build(name, 100 + i).state_dict().items()}
        path = os.path.join(folder, f"member{i}.safetensors")
        save_file(state, path, metadata={"nt.arch": json.dumps(spec)})
        files.append(path)
    return files


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16_bn", "mobilenet_v2"])
def test_a_fused_torchvision_model_loads_back_with_ntctls_logits(name, k, tmp_path):
    spec = arch_from_module(build(name, 0), torch.randn(2, 3, 32, 32), name=name)
    members = save_members(name, k, spec, str(tmp_path))
    fused = str(tmp_path / "fused.safetensors")
    out = ntctl("fuse", "--method", "nt", "--guard", "always", "-o", fused, *members)
    assert out.returncode == 0, out.stderr
    assert "exactness guard: passed" in out.stdout + out.stderr, out.stdout + out.stderr

    torch.manual_seed(1)
    x = torch.randn(5, 3, 32, 32)
    np.save(tmp_path / "x.npy", x.numpy())
    out = ntctl("eval", "--inputs", str(tmp_path / "x.npy"), "--logits", str(tmp_path / "y.npy"), fused)
    assert out.returncode == 0, out.stderr
    theirs = torch.from_numpy(np.load(tmp_path / "y.npy"))

    state = load_file(fused)
    native = build(name, 0)
    native.load_state_dict(state)  # strict: the same names and shapes as torchvision's
    rebuilt = module_from_arch(fused)
    rebuilt.load_state_dict(state)
    rebuilt.eval()
    with torch.no_grad():
        for model in (native, rebuilt):
            logits = model(x)
            assert logits.shape == theirs.shape
            assert (logits - theirs).abs().max().item() <= 1e-4


def concatenate(members):
    """The reference's dense wide model: every conv, Linear and BatchNorm of
    the K members side by side (a depthwise conv over K times the channels),
    the first layer reading the shared input, the last averaging."""
    k = len(members)
    wide = build("mobilenet_v2", 0)
    names = [n for n, m in wide.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    first, last = names[0], names[-1]
    modules = [dict(m.named_modules()) for m in members]
    with torch.no_grad():
        for name in names:
            ms = [mods[name] for mods in modules]
            m0 = ms[0]
            if isinstance(m0, nn.BatchNorm2d):
                new = nn.BatchNorm2d(m0.num_features * k)
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    getattr(new, attr).copy_(torch.cat([getattr(m, attr) for m in ms]))
            elif isinstance(m0, nn.Conv2d) and m0.groups > 1:
                c = m0.out_channels * k
                new = nn.Conv2d(c, c, m0.kernel_size, m0.stride, m0.padding, groups=c, bias=False)
                new.weight.copy_(torch.cat([m.weight for m in ms]))
            else:
                o, i = m0.weight.shape[:2]
                rows = o if name == last else o * k
                cols = i if name == first else i * k
                if isinstance(m0, nn.Linear):
                    new = nn.Linear(cols, rows, bias=m0.bias is not None)
                else:
                    new = nn.Conv2d(cols, rows, m0.kernel_size, m0.stride, m0.padding, bias=False)
                new.weight.zero_()
                for j, m in enumerate(ms):
                    r = slice(None) if name == last else slice(j * o, (j + 1) * o)
                    c = slice(None) if name == first else slice(j * i, (j + 1) * i)
                    new.weight[r, c] = m.weight / k if name == last else m.weight
                if m0.bias is not None:
                    new.bias.copy_(sum(m.bias for m in ms) / k if name == last else torch.cat([m.bias for m in ms]))
            parent = wide
            *path, leaf = name.split(".")
            for p in path:
                parent = getattr(parent, p)
            setattr(parent, leaf, new)
    return wide.eval(), last


@pytest.mark.parametrize("k", [2, 4])
def test_nt_on_mobilenet_v2_equals_the_reference(k, tmp_path):
    import torch_pruning as tp

    members = [build("mobilenet_v2", 100 + i) for i in range(k)]
    wide, last = concatenate(members)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        mean = sum(m(x) for m in members) / k
        assert (wide(x) - mean).abs().max().item() < 1e-5
    tp.pruner.MagnitudePruner(
        wide,
        torch.randn(1, 3, 32, 32),
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=1 - 1 / k,
        root_module_types=[nn.Conv2d, nn.Linear],
        ignored_layers=[dict(wide.named_modules())[last]],
    ).step()
    reference = wide.state_dict()

    files = []
    for i, m in enumerate(members):
        files.append(str(tmp_path / f"m{i}.safetensors"))
        save_file({n: t.contiguous() for n, t in m.state_dict().items()}, files[-1])
    fused = str(tmp_path / "nt.safetensors")
    out = ntctl("fuse", "--arch", "mobilenet_v2", "--method", "nt", "-o", fused, *files)
    assert out.returncode == 0, out.stderr
    ours = load_file(fused)
    assert set(ours) == set(reference)
    for n, t in ours.items():
        if n.endswith("num_batches_tracked"):
            continue
        assert t.shape == reference[n].shape, n
        assert torch.equal(t, reference[n]), n
