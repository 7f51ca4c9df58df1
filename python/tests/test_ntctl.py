"""The Rust side takes what the importer writes: `ntctl arch show` reads each
imported spec back unchanged with the model's parameter count, and `ntctl
fuse` fuses members of an imported model into checkpoints that
module_from_arch loads. These need the nt.arch/v1 ops of issue 12 in
`fusion/src/arch` (groups, relu6, hardswish, gelu, leaky_relu, sigmoid,
tanh, adaptive pools larger than their input) and the ntctl binary
(`cargo build -p ntctl`; `make test` builds it before running these)."""

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, torchvision_import
from models import Everything, Fusable, Mlp, Upsampling
from ntpy.arch import arch_from_module, module_from_arch

NTCTL = os.environ.get("NTCTL", os.path.join(REPO, "target", "debug", "ntctl"))


def ntctl(*args):
    if not os.access(NTCTL, os.X_OK):
        pytest.fail(
            f"no ntctl binary at {NTCTL}: build it with `cargo build -p ntctl` (or point NTCTL at one); "
            "these tests check that the Rust side accepts the importer's specs"
        )
    return subprocess.run([NTCTL, *args], capture_output=True, text=True, timeout=300)


def custom(make, shape, name):
    torch.manual_seed(0)
    model = make()
    return model, arch_from_module(model, torch.randn(2, *shape), name=name)


SPECS = {
    "resnet18": lambda: torchvision_import("resnet18"),
    "resnet50": lambda: torchvision_import("resnet50"),
    "vgg16_bn": lambda: torchvision_import("vgg16_bn"),
    "mobilenet_v2": lambda: torchvision_import("mobilenet_v2"),
    "everything": lambda: custom(Everything, (3, 16, 16), "everything"),
    "upsampling": lambda: custom(Upsampling, (3, 8, 8), "upsampling"),
    "mlp": lambda: custom(Mlp, (12,), "mlp"),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_ntctl_reads_the_imported_spec_back_unchanged(name, tmp_path):
    model, spec = SPECS[name]()
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = ntctl("--output", "json", "arch", "show", str(path))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == spec
    out = ntctl("arch", "show", str(path))
    assert out.returncode == 0, out.stderr
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = list(model.eval()(torch.zeros(2, *spec["input"])).shape[1:])
    assert f"{name}: {params} parameters, input {spec['input']}, output {logits}" in out.stderr


def test_ntctl_fuses_members_of_an_imported_model(tmp_path):
    model, spec = custom(Fusable, (3, 8, 8), "fusable")
    members, paths = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        member = Fusable().eval()
        members.append(member)
        path = str(tmp_path / f"member{seed}.safetensors")
        state = {k: v.contiguous() for k, v in member.state_dict().items()}
        save_file(state, path, metadata={"nt.arch": json.dumps(spec)})
        paths.append(path)
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ensemble = sum(m(x) for m in members) / len(members)

    # concat: the wide model that computes the ensemble's mean, with its own
    # (wider) architecture recorded in the checkpoint.
    wide_path = str(tmp_path / "concat.safetensors")
    out = ntctl("fuse", "--method", "concat", "-o", wide_path, *paths)
    assert out.returncode == 0, out.stderr
    wide = module_from_arch(wide_path)
    wide.load_state_dict(load_file(wide_path), strict=True)
    with torch.no_grad():
        assert torch.allclose(wide.eval()(x), ensemble, atol=1e-4)

    # nt: the member's architecture and names, loaded as it is.
    nt_path = str(tmp_path / "nt.safetensors")
    out = ntctl("fuse", "--method", "nt", "-o", nt_path, *paths)
    assert out.returncode == 0, out.stderr
    fused = module_from_arch(spec)
    fused.load_state_dict(load_file(nt_path), strict=True)
    with torch.no_grad():
        assert fused.eval()(x).shape == (6, 10)
