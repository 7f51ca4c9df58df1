#!/usr/bin/env python3
"""Fusion cost: `ntctl fuse` against the paper's reference code, in one script.

The paper's fusion-cost benchmark (its `ex12_comparison_time_memory.py`): two
3072-W-W-10 MLPs without bias, W from 32 to 16384, fused by weight averaging,
NT and OT; plus NT on ResNet18 for K = 2, 4, 8, and on torchvision's own
ResNet50 and VGG16 (10 classes, 32x32 inputs) for K = 2 and 4. The reference approaches are
re-implemented here as the paper's code runs them:

* average: copy member 0, zero it, add every member, divide by K;
* nt: build the dense concatenated model (block-diagonal middle layers), then
  prune it back with torch-pruning 1.3.7's MagnitudePruner (L2 magnitude,
  output layer ignored);
* ot: otfusion's weight mode (`fuse_optimal_transport`): for every member
  j > 0 and every layer from the input, past correction (`W_j T_prev`), the
  ground metric as the reference computes it (Euclidean, not squared, from
  an n x n x d tensor of differences), the exact plan from POT's `ot.emd`
  with uniform marginals and its default iteration limit, the correction
  `T diag(1/(1/n + 1e-7))`, the aligned layer `T^T W_j`; the output layer is
  aligned too; the fused model is member 0 plus the aligned members over K.

Ours and the reference run as child processes of this script on the same
member files; each child's peak RSS comes from GNU time, and each reports the
time of the fusion itself (loading and saving excluded). The results are
compared tensor by tensor. A point that runs past --time-limit is stopped
and the method's larger widths are skipped; the reference OT's ground metric
is predicted (2 n^2 d 4 bytes for its widest layer) and a point that would not
fit in the memory available is skipped with a note instead of being run, and
any child is killed if its RSS passes what is available.

Run with the project's virtualenv (`make bench-fusion`, which installs POT
when it is missing):
    python3 bench/fusion_bench.py [--quick] [--widths 512,1024] [--methods average,nt,ot]
        [--resnet-k 2,4] [--time-limit 600] [--json rows.json] [--plot fusion.svg]
"""

import argparse
import copy
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_models import preset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NTCTL = os.environ.get("NTCTL", os.path.join(ROOT, "target", "release", "ntctl"))
DEFAULT_WIDTHS = ",".join(str(32 << i) for i in range(10))  # 32 .. 16384
MIB = 2**20


# torchvision's families, built by torchvision itself, and the nt presets
# with the same state_dict (32x32 inputs, 10 classes).
FAMILIES = {
    "resnet50": ("resnet50:stem=imagenet", "ResNet50"),
    "vgg16": ("vgg16", "VGG16"),
}


def make(kind, width):
    if kind in FAMILIES:
        import torchvision

        return getattr(torchvision.models, kind)(num_classes=10)
    # nt's preset (3072-W-W-10 MLP without bias, or ResNet18), built from its spec.
    return preset(arch_of(kind, width))


def example_input(kind):
    return torch.randn(1, 3072) if kind == "mlp" else torch.randn(1, 3, 32, 32)


def arch_of(kind, width):
    if kind == "mlp":
        return f"mlp:input=3072,hidden={width},depth=2,classes=10,bias=false"
    return FAMILIES[kind][0] if kind in FAMILIES else "resnet18"


def model_name(kind, width):
    if kind == "mlp":
        return f"MLP 3072-{width}-{width}-10"
    return FAMILIES[kind][1] if kind in FAMILIES else "ResNet18"


# ---------------------------------------------------------------- reference: NT


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


def reference_nt(kind, members):
    import torch_pruning as tp

    k = len(members)
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
    return wide, {}


# ---------------------------------------------------------------- reference: average


def reference_average(kind, members):
    """The paper's `average_weights`: a copy of member 0 zeroed, every member added, over K."""
    fused = copy.deepcopy(members[0])
    state = {n: torch.zeros_like(t) for n, t in fused.state_dict().items()}
    for m in members:
        for n, t in m.state_dict().items():
            state[n] += t
    fused.load_state_dict({n: t.float() / len(members) for n, t in state.items()})
    return fused, {}


# ---------------------------------------------------------------- reference: OT


def reference_ground_metric(x, y):
    """otfusion's `_cost_matrix_xy` with p = 2, not squared: |x_i - y_k| from the
    full n x m x d tensor of differences (and its absolute value and square),
    which is where the reference's memory goes. Checked non-negative and finite
    as the reference's `GroundMetric.process` does."""
    cost = torch.sum(torch.abs(x[:, None, :] - y[None, :, :]) ** 2, dim=2) ** 0.5
    assert not (cost < 0).any() and not torch.isnan(cost).any()
    return cost


def reference_align(member, base, eps=1e-7):
    """`get_wassersteinized_layers_modularized_not_averaged` in weight mode for an
    MLP without bias: `member`'s layers in `base`'s neuron order, from the input,
    the output layer included."""
    import numpy as np
    import ot

    aligned, plan, iter_limit_hits = [], None, 0
    for w, w0 in zip(member.parameters(), base.parameters()):
        w, w0 = w.data, w0.data
        n = w.shape[0]
        corrected = w if plan is None else w @ plan  # past correction
        cost = reference_ground_metric(corrected, w0)
        uniform = np.ones(n) / n
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = ot.emd(uniform, uniform, cost.cpu().numpy())
        iter_limit_hits += sum("numItermax" in str(c.message) for c in caught)
        plan = torch.from_numpy(t).float()
        plan = plan @ torch.diag(1.0 / (torch.ones(n) / n + eps))
        aligned.append(plan.t() @ corrected)
    return aligned, iter_limit_hits


def reference_ot(kind, members):
    """`geometric_ensembling_modularized_multiple_models`: every member j > 0
    aligned to member 0, summed onto member 0 in member order, over K."""
    base = copy.deepcopy(members[0])
    fused = copy.deepcopy(members[0])
    state = fused.state_dict()
    hits = 0
    for j, m in enumerate(members[1:]):
        layers, h = reference_align(m, base)
        hits += h
        for name, layer in zip(state, layers):
            state[name] += layer
            if j == len(members) - 2:
                state[name] = state[name] / len(members)
    fused.load_state_dict(state)
    return fused, {"emd_iteration_limit_hits": hits}


REFERENCE = {"average": reference_average, "nt": reference_nt, "ot": reference_ot}


def reference(method, kind, width, member_files, out_file):
    from safetensors.torch import load_file, save_file

    # Imports (POT pulls in scipy: seconds) happen before the clock starts.
    if method == "nt":
        import torch_pruning  # noqa: F401
    if method == "ot":
        import ot  # noqa: F401
    members = []
    for f in member_files:
        m = make(kind, width)
        m.load_state_dict(load_file(f))
        m._nt_kind = (kind, width)
        members.append(m)
    start = time.perf_counter()
    fused, extra = REFERENCE[method](kind, members)  # torch-pruning needs autograd on
    seconds = time.perf_counter() - start
    save_file({n: t.contiguous() for n, t in fused.state_dict().items()}, out_file)
    print(json.dumps({"seconds": seconds, **extra}))


def predicted_reference_ot_bytes(width, member_bytes):
    """Peak of the reference OT: its ground metric holds two n x n x d f32
    tensors at once (the differences and their absolute value, then that and
    its square) for the widest layer, plus the members, their copies and the
    Python/torch runtime (~0.6 GiB)."""
    layers = [(width, 3072), (width, width), (10, width)]
    metric = max(2 * n * n * d * 4 for n, d in layers)
    return metric + 3 * member_bytes + 600 * MIB


# ---------------------------------------------------------------- driver


class Stopped(Exception):
    """A child stopped by this script: past the time limit or the memory available."""


def tree_rss(pid):
    """RSS of a process and its descendants, in bytes (0 once it is gone)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return total


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(cmd, time_limit, rss_limit):
    """Runs a command under GNU time; returns (stdout, wall seconds, peak RSS bytes).

    The peak comes from time's wait4 on a child it forked itself: measuring our
    own child would count the RSS this (torch-laden) process had at fork time.
    The child's process group is killed past `time_limit` seconds or once its
    RSS passes `rss_limit` bytes (polled every 50 ms), raising Stopped."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            ["/usr/bin/time", "-f", "NT_MAXRSS_KB %M", *cmd], stdout=out, stderr=err, start_new_session=True
        )
        why, peak_seen = None, 0
        while proc.poll() is None:
            rss = tree_rss(proc.pid)
            peak_seen = max(peak_seen, rss)
            if time.perf_counter() - start > time_limit:
                why = f"stopped after {time_limit:.0f} s"
            elif rss > rss_limit:
                why = f"killed at {rss / 2**30:.1f} GiB RSS (available {rss_limit / 2**30:.1f} GiB)"
            if why:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise Stopped(why)
            time.sleep(0.05)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    peak = [line for line in stderr.splitlines() if line.startswith("NT_MAXRSS_KB ")]
    return stdout, wall, int(peak[-1].split()[1]) * 1024


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
                count = 1
                for d in h.get_slice(n).get_shape():
                    count *= d
                total += count * 4
    return total


def bench_one(kind, width, k, method, folder, run_ours, run_ref, time_limit, repeats=1):
    """One point: ours and the reference (each when asked) on the same
    members, each run `repeats` times in turn (ours, reference, ours, ...);
    the row keeps the median time and the largest peak, and every time."""
    members = write_members(kind, width, k, folder)
    member_bytes = float_bytes(members)
    io_bytes = member_bytes * (k + 1) // k
    arch = arch_of(kind, width)
    ours_file = os.path.join(folder, "ours.safetensors")
    ref_file = os.path.join(folder, "reference.safetensors")
    row = {
        "model": model_name(kind, width),
        "width": width,
        "k": k,
        "method": method,
        "io_mb": io_bytes / MIB,
        "load_before": os.getloadavg()[0],
        "notes": [],
    }
    for _ in range(repeats):
        run_points(row, kind, width, k, method, arch, members, member_bytes, ours_file, ref_file,
                   run_ours and "ours_stopped" not in row, run_ref and "ref_stopped" not in row and "ref_skipped" not in row,
                   time_limit)
    for side in ("ours", "ref"):
        times = row.pop(f"{side}_runs", [])
        if times:
            row[f"{side}_s"] = sorted(times)[len(times) // 2]
            if len(times) > 1:
                row[f"{side}_all_s"] = times
    if "ours_s" in row and "ref_s" in row:
        row["max_abs_diff"] = compare(ours_file, ref_file)
        row["speedup"] = row["ref_s"] / row["ours_s"]
    for key, name in (("ours", "ours_peak_mb"), ("ref", "ref_peak_mb")):
        if name in row:
            row[f"{key}_peak_over_io"] = row[name] / row["io_mb"]
    for f in members + [ours_file, ref_file]:
        if os.path.exists(f):
            os.remove(f)
    return row


def run_points(row, kind, width, k, method, arch, members, member_bytes, ours_file, ref_file, run_ours, run_ref,
               time_limit):
    """One run of ours and one of the reference, added to `row`."""
    if run_ours:
        try:
            out, wall, rss = run_child(
                [NTCTL, "--output", "json", "fuse", "--method", method, "--guard", "off", "--arch", arch,
                 "-o", ours_file, *members],
                time_limit,
                mem_available() - 512 * MIB,
            )
            row.setdefault("ours_runs", []).append(json.loads(out)["seconds"])
            row["ours_peak_mb"] = max(row.get("ours_peak_mb", 0), rss / MIB)
            row["ours_wall_s"] = wall
        except Stopped as e:
            row["ours_stopped"] = str(e)
            row["notes"].append(f"ours {e}")
    if run_ref:
        available = mem_available() - 512 * MIB
        predicted = predicted_reference_ot_bytes(width, member_bytes) if method == "ot" else 0
        if predicted > available:
            row["ref_skipped"] = f"needs ~{predicted / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
            row["notes"].append(f"reference {row['ref_skipped']}")
        else:
            try:
                out, wall, rss = run_child(
                    [sys.executable, os.path.abspath(__file__), "--reference", method, kind, str(width), ref_file,
                     *members],
                    time_limit,
                    available,
                )
                rep = json.loads(out.strip().splitlines()[-1])
                row.setdefault("ref_runs", []).append(rep["seconds"])
                row["ref_peak_mb"] = max(row.get("ref_peak_mb", 0), rss / MIB)
                row["ref_wall_s"] = wall
                if rep.get("emd_iteration_limit_hits"):
                    row["notes"].append(f"ot.emd hit numItermax on {rep['emd_iteration_limit_hits']} layer(s)")
                if method == "ot":
                    row["ref_predicted_mb"] = predicted / MIB
            except Stopped as e:
                row["ref_stopped"] = str(e)
                row["notes"].append(f"reference {e}")


def fmt(row, key, spec, missing="-"):
    return format(row[key], spec) if key in row else missing


def table_line(r):
    diff = r.get("max_abs_diff")
    return (
        f"| {r['width'] if r['model'].startswith('MLP') else r['model'] + ' K=' + str(r['k'])} | {r['method']} "
        f"| {fmt(r, 'ours_s', '.3f')} | {fmt(r, 'ours_peak_mb', '.0f')} "
        f"| {fmt(r, 'ref_s', '.3f')} | {fmt(r, 'ref_peak_mb', '.0f')} "
        f"| {fmt(r, 'speedup', '.1f')}{'x' if 'speedup' in r else ''} | {r['io_mb']:.1f} "
        f"| {fmt(r, 'ours_peak_over_io', '.2f')}{'x' if 'ours_peak_over_io' in r else ''} "
        f"| {fmt(r, 'ours_above_runtime_over_io', '.2f')}{'x' if 'ours_above_runtime_over_io' in r else ''} "
        f"| {fmt(r, 'ref_peak_over_io', '.2f')}{'x' if 'ref_peak_over_io' in r else ''} "
        f"| {'-' if diff is None else f'{diff:.1e}'} | {r['load_before']:.1f} | {'; '.join(r['notes'])} |"
    )


TABLE_HEADER = (
    "| W | method | ours s | ours peak MiB | reference s | reference peak MiB | speedup | in+out MiB "
    "| ours / in+out | ours less runtime / in+out | reference / in+out | max\\|diff\\| | load | notes |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


# ---------------------------------------------------------------- plot (SVG, no dependencies)


def svg_plot(rows, path):
    """Log-log time and peak memory against W, ours solid and the reference
    dashed, one colour per method; a hand-written SVG, since the virtualenv has
    no plotting library and the project's plotting (plotters) lives in Rust."""
    import math

    colours = {"average": "#1f77b4", "nt": "#2ca02c", "ot": "#d62728"}
    mlp = [r for r in rows if r["model"].startswith("MLP")]
    widths = sorted({r["width"] for r in mlp})
    if not widths:
        return
    panel_w, panel_h, left, top, gap = 460, 340, 70, 50, 110
    total_w = left + 2 * panel_w + gap + 30
    total_h = top + panel_h + 110
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{total_h}" '
        f'font-family="DejaVu Sans, sans-serif" font-size="12">',
        f'<rect width="{total_w}" height="{total_h}" fill="white"/>',
        f'<text x="{total_w / 2}" y="22" text-anchor="middle" font-size="16">Fusing two 3072-W-W-10 MLPs: '
        "ntctl (solid) against the paper's reference code (dashed)</text>",
    ]
    panels = [("fusion time, s", "ours_s", "ref_s"), ("peak RSS, MiB", "ours_peak_mb", "ref_peak_mb")]
    xlo, xhi = math.log10(widths[0]), math.log10(widths[-1])
    for p, (label, ours_key, ref_key) in enumerate(panels):
        x0 = left + p * (panel_w + gap)
        values = [r[k] for r in mlp for k in (ours_key, ref_key) if k in r and r[k] > 0]
        if p == 1:
            values += [r["io_mb"] for r in mlp]
        ylo = math.floor(math.log10(min(values)))
        yhi = math.ceil(math.log10(max(values)))
        if yhi == ylo:
            yhi += 1

        def sx(w):
            return x0 + (math.log10(w) - xlo) / (xhi - xlo) * panel_w

        def sy(v):
            return top + panel_h - (math.log10(v) - ylo) / (yhi - ylo) * panel_h

        out.append(f'<rect x="{x0}" y="{top}" width="{panel_w}" height="{panel_h}" fill="none" stroke="#444"/>')
        for e in range(ylo, yhi + 1):
            y = sy(10**e)
            out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + panel_w}" y2="{y:.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">1e{e}</text>')
        for w in widths:
            x = sx(w)
            out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + panel_h}" stroke="#eee"/>')
            out.append(f'<text x="{x:.1f}" y="{top + panel_h + 16}" text-anchor="middle" font-size="10">{w}</text>')
        out.append(f'<text x="{x0 + panel_w / 2}" y="{top + panel_h + 36}" text-anchor="middle">W (hidden width)</text>')
        out.append(f'<text x="{x0 + panel_w / 2}" y="{top - 8}" text-anchor="middle" font-size="14">{label}</text>')
        series = []
        for method, colour in colours.items():
            for key, dash in ((ours_key, ""), (ref_key, ' stroke-dasharray="6,4"')):
                pts = [(sx(r["width"]), sy(r[key])) for r in mlp if r["method"] == method and key in r and r[key] > 0]
                series.append((pts, colour, dash))
        if p == 1:
            pts = [(sx(r["width"]), sy(r["io_mb"])) for r in mlp if r["method"] == "average"]
            series.append((pts, "#888", ' stroke-dasharray="2,3"'))
        for pts, colour, dash in series:
            if len(pts) > 1:
                d = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
                out.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
            for x, y in pts:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>')
    ly = top + panel_h + 62
    lx = left
    legend = [(f"{m} (ours, ref dashed)", c, "") for m, c in colours.items()]
    legend.append(("members + output (memory)", "#888", ' stroke-dasharray="2,3"'))
    for text, colour, dash in legend:
        out.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 30}" y2="{ly}" stroke="{colour}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{lx + 36}" y="{ly + 4}">{text}</text>')
        lx += 250
    out.append(
        f'<text x="{left}" y="{ly + 26}" font-size="11">Missing reference points: OT past W = 512 needs more memory than '
        "the machine has (n x n x d ground metric); stopped or skipped points are listed in the table.</text>"
    )
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--reference":
        method, kind, width, out_file, *members = sys.argv[2:]
        reference(method, kind, int(width), members, out_file)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default=DEFAULT_WIDTHS)
    ap.add_argument("--methods", default="average,nt,ot")
    ap.add_argument("--resnet-k", default="2,4,8", help="NT on ResNet18 for these K")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of each side per torchvision-family point (median kept)")
    ap.add_argument("--family-k", default="2,4",
                    help="NT on torchvision's ResNet50 and VGG16 for these K (empty: none)")
    ap.add_argument("--time-limit", type=float, default=600, help="seconds per child before it is stopped")
    ap.add_argument("--quick", action="store_true", help="W = 512, 1024 and ResNet18 K = 2 only")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--plot", help="write the log-log plot (SVG) here")
    args = ap.parse_args()
    if args.quick:
        args.widths, args.resnet_k, args.family_k = "512,1024", "2", ""
    if not os.path.exists(NTCTL):
        sys.exit(f"{NTCTL} is missing: run `make build` first (or set NTCTL)")
    methods = [m for m in args.methods.split(",") if m]
    if "ot" in methods:
        try:
            import ot
        except ImportError:
            sys.exit("POT is missing from the virtualenv: `make bench-fusion` installs it")
        pot = ot.__version__
    else:
        pot = "-"
    import torch_pruning

    print(
        f"# {platform.node()}: {os.cpu_count()} cores, {mem_available() / 2**30:.1f} GiB available, "
        f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, POT {pot}, torch-pruning "
        f"{getattr(torch_pruning, '__version__', '1.3.7 (pinned)')}; ntctl {NTCTL}",
        flush=True,
    )
    # ntctl's own runtime (libtorch and the rest mapped in): `ntctl arch list`.
    _, _, runtime = run_child([NTCTL, "arch", "list"], 60, mem_available())
    print(f"# ntctl's runtime alone (`ntctl arch list`): {runtime / MIB:.0f} MiB peak RSS", flush=True)
    print(TABLE_HEADER, flush=True)
    configs = [("mlp", int(w), 2, m) for w in args.widths.split(",") if w for m in methods]
    if "nt" in methods:
        configs += [("resnet18", 64, int(k), "nt") for k in args.resnet_k.split(",") if k]
        configs += [(f, 64, int(k), "nt") for f in FAMILIES for k in args.family_k.split(",") if k]
    rows, done = [], {}  # done[(kind, method, side)]: why larger widths are skipped
    with tempfile.TemporaryDirectory(prefix="nt-fusion-bench-") as folder:
        for kind, width, k, method in configs:
            run_ours = (kind, method, "ours") not in done
            run_ref = (kind, method, "ref") not in done
            if not run_ours and not run_ref:
                continue
            r = bench_one(kind, width, k, method, folder, run_ours, run_ref, args.time_limit,
                          args.repeats if kind in FAMILIES else 1)
            if "ours_peak_mb" in r:
                r["ours_above_runtime_over_io"] = (r["ours_peak_mb"] - runtime / MIB) / r["io_mb"]
            for side in ("ours", "ref"):
                if (kind, method, side) in done:
                    r["notes"].append(f"{'ours' if side == 'ours' else 'reference'} skipped: "
                                      f"{done[(kind, method, side)]}")
                elif f"{side}_stopped" in r or f"{side}_skipped" in r:
                    done[(kind, method, side)] = f"past its limit at W = {width}"
            rows.append(r)
            print(table_line(r), flush=True)
    print(f"# done; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        svg_plot(rows, args.plot)


if __name__ == "__main__":
    main()
