#!/usr/bin/env python3
"""NT fusion: `ntctl fuse` against the reference approach, in one script.

The reference approach is the paper's: build the dense concatenated model
(block-diagonal middle layers), then prune it back with torch-pruning 1.3.7's
MagnitudePruner (L2 magnitude, output layer ignored). Both run as child
processes of this script on the same member files; each child's peak RSS comes
from GNU time, and each reports the time of the fusion itself (loading and
saving excluded). The two results are compared tensor by tensor.

Run with the project's virtualenv (`make bench-fusion`):
    python3 bench/fusion_bench.py [--quick] [--widths 512,1024] [--resnet-k 2,4]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_models import MLP, ResNet18  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NTCTL = os.environ.get("NTCTL", os.path.join(ROOT, "target", "release", "ntctl"))


def make(kind, width):
    # 3072-W-W-10 without bias: nt preset `mlp:input=3072,hidden=W,depth=2`.
    return MLP(inputs=3072, hidden=width, depth=2) if kind == "mlp" else ResNet18()


def example_input(kind):
    return torch.randn(1, 3072) if kind == "mlp" else torch.randn(1, 3, 32, 32)


# ---------------------------------------------------------------- reference approach


def concatenate(members):
    """The dense wide model: first layer stacked, middle layers block-diagonal,
    output layer concatenated along its inputs and scaled by 1/K, BatchNorms stacked."""
    k = len(members)
    wide = make(*members[0]._nt_kind)
    names = [n for n, m in members[0].named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d))]
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
            else:
                w0 = m0.weight
                out_total = w0.shape[0] if name == last else w0.shape[0] * k
                in_total = w0.shape[1] if name == first else w0.shape[1] * k
                if isinstance(m0, nn.Linear):
                    new = nn.Linear(in_total, out_total, bias=m0.bias is not None)
                else:
                    new = nn.Conv2d(in_total, out_total, m0.kernel_size, m0.stride, m0.padding, bias=m0.bias is not None)
                new.weight.zero_()
                o, i = w0.shape[0], w0.shape[1]
                for j, m in enumerate(ms):
                    rows = slice(None) if name == last else slice(j * o, (j + 1) * o)
                    cols = slice(None) if name == first else slice(j * i, (j + 1) * i)
                    new.weight[rows, cols] = m.weight / k if name == last else m.weight
                if m0.bias is not None:
                    new.bias.copy_(sum(m.bias for m in ms) / k if name == last else torch.cat([m.bias for m in ms]))
            parent = wide
            *path, leaf = name.split(".")
            for p in path:
                parent = getattr(parent, p)
            setattr(parent, leaf, new)
    return wide, last


def reference(kind, width, member_files, out_file):
    import torch_pruning as tp
    from safetensors.torch import load_file, save_file

    members = []
    for f in member_files:
        m = make(kind, width)
        m.load_state_dict(load_file(f))
        m._nt_kind = (kind, width)
        members.append(m)
    k = len(members)
    start = time.perf_counter()
    wide, last = concatenate(members)
    pruner = tp.pruner.MagnitudePruner(
        wide,
        example_input(kind),
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=1 - 1 / k,
        root_module_types=[nn.Conv2d, nn.Linear],
        ignored_layers=[dict(wide.named_modules())[last]],
    )
    pruner.step()
    seconds = time.perf_counter() - start
    save_file({n: t.contiguous() for n, t in wide.state_dict().items()}, out_file)
    print(json.dumps({"seconds": seconds}))


# ---------------------------------------------------------------- driver


def run_child(cmd):
    """Runs a command under GNU time; returns (stdout, wall seconds, peak RSS bytes).

    The peak comes from time's wait4 on a child it forked itself: measuring our
    own child would count the RSS this (torch-laden) process had at fork time."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "NT_MAXRSS_KB %M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    peak = [line for line in proc.stderr.splitlines() if line.startswith("NT_MAXRSS_KB ")]
    return proc.stdout, wall, int(peak[-1].split()[1]) * 1024


def write_members(kind, width, k, folder):
    from safetensors.torch import save_file

    files = []
    for i in range(k):
        torch.manual_seed(1000 + i)
        m = make(kind, width)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.uniform_(-0.1, 0.1)
                    mod.running_mean.uniform_(-0.1, 0.1)
                    mod.running_var.uniform_(0.5, 1.5)
        path = os.path.join(folder, f"member_{i}.safetensors")
        save_file({n: t.contiguous() for n, t in m.state_dict().items()}, path)
        files.append(path)
        del m
    return files


def compare(a_file, b_file):
    from safetensors import safe_open

    worst = 0.0
    with safe_open(a_file, "pt") as a, safe_open(b_file, "pt") as b:
        if set(a.keys()) != set(b.keys()):
            return float("inf")
        for name in a.keys():
            x, y = a.get_tensor(name), b.get_tensor(name)
            if x.shape != y.shape:
                return float("inf")
            if x.is_floating_point():
                worst = max(worst, (x - y).abs().max().item())
    return worst


def float_bytes(files):
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(f, "pt") as h:
            for n in h.keys():
                s = h.get_slice(n)
                count = 1
                for d in s.get_shape():
                    count *= d
                total += count * 4
    return total


def bench_one(kind, width, k, folder):
    members = write_members(kind, width, k, folder)
    arch = f"mlp:input=3072,hidden={width},depth=2,classes=10,bias=false" if kind == "mlp" else "resnet18"
    ours_file = os.path.join(folder, "ours.safetensors")
    ref_file = os.path.join(folder, "reference.safetensors")
    out, ours_wall, ours_rss = run_child(
        [NTCTL, "--output", "json", "fuse", "--guard", "off", "--arch", arch, "-o", ours_file, *members]
    )
    ours_seconds = json.loads(out)["seconds"]
    out, ref_wall, ref_rss = run_child(
        [sys.executable, os.path.abspath(__file__), "--reference", kind, str(width), ref_file, *members]
    )
    ref_seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
    io_bytes = float_bytes(members) + float_bytes([ours_file])
    diff = compare(ours_file, ref_file)
    for f in members + [ours_file, ref_file]:
        os.remove(f)
    return {
        "model": f"MLP 3072-{width}-{width}-10" if kind == "mlp" else "ResNet18",
        "k": k,
        "ours_s": ours_seconds,
        "ref_s": ref_seconds,
        "speedup": ref_seconds / ours_seconds,
        "ours_peak_mb": ours_rss / 2**20,
        "ref_peak_mb": ref_rss / 2**20,
        "io_mb": io_bytes / 2**20,
        "peak_over_io": ours_rss / io_bytes,
        "ours_wall_s": ours_wall,
        "ref_wall_s": ref_wall,
        "max_abs_diff": diff,
    }


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--reference":
        kind, width, out_file, *members = sys.argv[2:]
        reference(kind, int(width), members, out_file)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--resnet-k", default="2,4,8")
    ap.add_argument("--quick", action="store_true", help="W = 512, 1024 and ResNet18 K = 2 only")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if args.quick:
        args.widths, args.resnet_k = "512,1024", "2"
    if not os.path.exists(NTCTL):
        sys.exit(f"{NTCTL} is missing: run `make build` first (or set NTCTL)")
    configs = [("mlp", int(w), 2) for w in args.widths.split(",") if w]
    configs += [("resnet18", 64, int(k)) for k in args.resnet_k.split(",") if k]
    rows = []
    print(
        f"{'model':<22} {'K':>2} {'nt s':>8} {'ref s':>8} {'speedup':>8} "
        f"{'nt MB':>8} {'ref MB':>8} {'in+out MB':>9} {'nt/in+out':>9} {'max|diff|':>9}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="nt-fusion-bench-") as folder:
        for kind, width, k in configs:
            r = bench_one(kind, width, k, folder)
            rows.append(r)
            print(
                f"{r['model']:<22} {r['k']:>2} {r['ours_s']:>8.3f} {r['ref_s']:>8.3f} {r['speedup']:>7.1f}x "
                f"{r['ours_peak_mb']:>8.0f} {r['ref_peak_mb']:>8.0f} {r['io_mb']:>9.0f} {r['peak_over_io']:>8.2f}x "
                f"{r['max_abs_diff']:>9.1e}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
