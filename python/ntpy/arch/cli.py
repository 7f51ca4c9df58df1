"""`python -m ntpy.arch`: import a PyTorch model as an nt.arch/v1 spec, or
check that a spec (or a checkpoint's) builds into a module.

    python -m ntpy.arch import torchvision.models:resnet18 --input 3,32,32 \\
        --kwargs '{"num_classes": 10}' -o resnet18.json
    python -m ntpy.arch import my_model.py:Net --input 1,28,28
    python -m ntpy.arch module resnet18.json
    python -m ntpy.arch module nt-data/runs/<run>/fused/nt.safetensors

Errors in the input (a model nt.arch/v1 cannot express, a bad spec, a model
that cannot be imported) print one message on stderr and exit with 1.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys

import torch
from torch import nn

from .build import module_from_arch
from .errors import ArchError
from .spec import load_spec, resolve
from .trace import arch_from_module, verify

PROG = "python -m ntpy.arch"


class CliError(Exception):
    """A user error outside the spec itself (a model that cannot be imported)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser(
        "import",
        help="trace a PyTorch model and print its nt.arch/v1 spec",
        description="Traces MODEL with torch.fx and prints its nt.arch/v1 spec; then checks that the "
        "spec's module, with the model's weights, computes what the model does.",
    )
    imp.add_argument("model", metavar="MODEL", help="`package.module:callable` or `path/file.py:callable`")
    imp.add_argument("--input", required=True, help="one sample's shape: C,H,W (or 3x32x32, or FEATURES)")
    imp.add_argument("--kwargs", default="{}", help="keyword arguments of the callable, as a JSON object")
    imp.add_argument("--name", help="the spec's name (default: the callable's name)")
    imp.add_argument("-o", "--output", help="write the spec here instead of stdout")
    imp.add_argument("--no-verify", action="store_true", help="skip the check against the model's output")
    mod = commands.add_parser(
        "module",
        help="build the PyTorch module of a spec and run it once",
        description="Builds the module of a spec file (or of a checkpoint's recorded spec, loading "
        "its weights), runs it on a batch of zeros and prints a summary.",
    )
    mod.add_argument("spec", metavar="SPEC", help="a spec file, or a checkpoint (.safetensors)")
    mod.add_argument("--print", action="store_true", help="also print the module")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            return _import(args)
        return _module(args)
    except (ArchError, CliError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1


def _import(args) -> int:
    shape = _shape(args.input)
    try:
        kwargs = json.loads(args.kwargs)
    except ValueError as e:
        raise CliError(f"--kwargs is not JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise CliError("--kwargs must be a JSON object")
    make, default_name = _callable(args.model)
    try:
        model = make(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's code, reported as such
        raise CliError(f"calling {args.model} failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise CliError(f"{args.model} returned {type(model).__name__}, not a torch.nn.Module")
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    spec = arch_from_module(model, example, name=args.name or default_name)
    text = json.dumps(spec, indent=2) + "\n"
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise CliError(f"cannot write {args.output}: {e.strerror or e}") from None
    else:
        sys.stdout.write(text)
    params = sum(p.numel() for p in model.parameters())
    summary = f"{spec['name']}: {params:,} parameters, {len(spec['nodes'])} nodes, input {spec['input']}"
    if not args.no_verify:
        diff = verify(model, spec, example)
        summary += f"; the spec's module matches the model (largest difference {diff:.2g})"
    print(summary, file=sys.stderr)
    return 0


def _module(args) -> int:
    spec = load_spec(args.spec)
    plan = resolve(spec)
    module = module_from_arch(spec)
    loaded = ""
    if args.spec.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CliError("loading a checkpoint's weights needs the safetensors package") from None
        try:
            module.load_state_dict(load_file(args.spec))
        except RuntimeError as e:
            raise CliError(f"{args.spec}'s weights do not fit its architecture: {e}") from None
        loaded = f"; weights loaded from {args.spec}"
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *plan.input))
    except RuntimeError as e:
        raise CliError(f"the spec's module fails on a batch of zeros of shape {[2, *plan.input]}: {e}") from None
    params = sum(p.numel() for p in module.parameters())
    if args.print:
        print(module)
    print(
        f"{plan.name}: {params:,} parameters, {len(plan.nodes)} nodes, input {list(plan.input)}, "
        f"output {list(out.shape[1:])}{loaded}"
    )
    return 0


def _shape(text: str) -> list[int]:
    parts = text.replace("x", ",").split(",")
    try:
        shape = [int(p) for p in parts]
    except ValueError:
        shape = []
    if len(shape) not in (1, 3) or any(d < 1 for d in shape):
        raise CliError(f"--input must be C,H,W or FEATURES with positive sizes, got {text!r}")
    return shape


def _callable(text: str):
    """The object MODEL names, and its name (the spec's default name)."""
    where, sep, attr = text.rpartition(":")
    if not sep or not where or not attr:
        raise CliError(f"MODEL must be `package.module:callable` or `file.py:callable`, got {text!r}")
    if where.endswith(".py") or os.sep in where:
        module = _load_file(where)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise CliError(f"cannot import {where}: {e}") from None
        except Exception as e:  # noqa: BLE001 - the user's code
            raise CliError(f"importing {where} failed: {type(e).__name__}: {e}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"{where} has no `{attr}`")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"{text} is not callable")
    return obj, attr.split(".")[-1]


def _load_file(path: str):
    if not os.path.isfile(path):
        raise CliError(f"no file {path}")
    name = "_ntpy_model_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CliError(f"cannot load {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # The file's own imports of its neighbours work as when it is run.
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's code
        raise CliError(f"importing {path} failed: {type(e).__name__}: {e}") from None
    return module
