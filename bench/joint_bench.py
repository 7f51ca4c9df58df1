#!/usr/bin/env python3
"""Joint training (issue 14): K ensemble members trained by nt one after
another, by nt jointly, and by PyTorch's ensembling recipe, on one machine.

For each model and K:
  (a) nt sequential: `train` K times, one member after another;
  (b) nt joint: `train_joint`, the K members as one batched computation
      (per-member and batched kernels on the CPU, batched on CUDA);
  (c) PyTorch vmap: `torch.func.stack_module_state` over K modules built by
      ntpy's module_from_arch from the same nt spec, `functional_call` under
      `vmap` over the stacked parameters, buffers and inputs [K, N, ...]
      (each member its own batch), cross-entropy (each member's mean) summed
      over members, one torch.optim.SGD (lr 0.01, momentum 0.9) on the
      stacked parameters.
All three use Fashion-MNIST from the Debian package, normalised with the
subset's mean and std, on the device, each member drawing its own batches
by index from its own permutation; the same batch size and the same number
of steps per member. (a) and (b) are `joint-bench` (bench/src/bin/
joint_bench.rs); its figure is the aggregate samples/s of all members over
the wall time of the training calls after a warm-up. (c) is timed the same
way here (stacking and the optimiser's creation included, as joint training's
time includes its stacking).

Each measurement is repeated --repeats times (nt's modes alternate order
within joint-bench; nt and PyTorch alternate which goes first from one
configuration to the next) and the medians are compared. On a shared CPU
every measurement also records the CPU time other processes used meanwhile
(from /proc/stat); before each configuration the script waits (up to
--quiet-wait s) for the machine to be quiet, and medians use only the
measurements during which others used under --quiet cores where there are
any (the table flags a median that had to include contended ones).

Targets (issue 14): on CUDA, MLP and LeNet at K=8 joint >= 4x sequential and
>= 1.2x vmap, ResNet18 at K=4 joint >= 1.2x sequential; on the CPU joint
(the kernels nt picks there, per member) no slower than sequential, read as
a median ratio >= 0.95 (CPU timings on a shared 2-core machine vary by
several per cent between runs).

    python3 bench/joint_bench.py [--device cpu|cuda] [--k 2,4,8]
        [--models mlp,lenet,resnet18] [--steps N] [--batch N] [--repeats R]

Writes bench/results/joint-<date>-<device tag>.json (every measurement) and
.txt (the table); --out-dir elsewhere.
"""

import argparse
import copy
import datetime
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# ntpy from this checkout, whether or not `make setup` installed it.
sys.path.insert(0, os.path.join(ROOT, "python"))
from ntpy.arch import module_from_arch  # noqa: E402

JOINT_BENCH = os.environ.get("NT_JOINT_BENCH", os.path.join(ROOT, "target", "release", "joint-bench"))
FASHION = os.environ.get("NT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")

# name: (nt preset, {device: (batch, steps per member)}). The CPU sizes keep
# the whole CPU run (3 models, K = 2, 4, 8, 3 repeats) near ten minutes on 2
# cores (ResNet18 trains some 35 samples a second there); the CUDA sizes are
# meant to take a few minutes on one GPU. Steps * batch must not pass
# Fashion-MNIST's 60000 training images (one epoch per member).
MODELS = {
    "mlp": ("mlp", {"cpu": (256, 30), "cuda": (256, 200)}),
    "lenet": ("lenet", {"cpu": (256, 10), "cuda": (256, 200)}),
    "resnet18": ("resnet18:channels=1,size=28", {"cpu": (16, 4), "cuda": (256, 30)}),
}


def idx(name):
    """An IDX file of the Debian package as a uint8 tensor."""
    with gzip.open(os.path.join(FASHION, f"{name}.gz")) as f:
        data = f.read()
    rank = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank)]
    return torch.frombuffer(bytearray(data[4 + 4 * rank :]), dtype=torch.uint8).reshape(shape)


def fashion(samples, device):
    """The first `samples` training images, normalised, [n, 1, 28, 28] on `device`, and labels."""
    x = idx("train-images-idx3-ubyte")[:samples].float().div_(255).unsqueeze(1)
    y = idx("train-labels-idx1-ubyte")[:samples].long()
    if len(x) < samples:
        raise SystemExit(f"{samples} samples asked for, Fashion-MNIST has {len(x)}")
    x = (x - x.mean()) / x.std()
    return x.to(device), y.to(device)


def arch_spec(preset):
    out = subprocess.run([JOINT_BENCH, "--arch", preset, "--print-arch"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{JOINT_BENCH} --print-arch: {out.stderr.strip()}")
    return out.stdout


def busy_seconds():
    """CPU seconds the whole machine has been busy (all but idle and iowait), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_seconds():
    t = os.times()
    return t.user + t.system


def foreign_cores(busy0, own0, seconds):
    """Cores' worth of CPU time other processes used since (busy0, own0), over `seconds`."""
    busy1 = busy_seconds()
    if busy0 is None or busy1 is None:
        return None
    return max(0.0, (busy1 - busy0) - (own_seconds() - own0)) / seconds


def wait_quiet(limit, threshold):
    """Waits up to `limit` seconds until other processes use under `threshold` cores (over 1 s); returns
    the seconds waited and the last load seen."""
    waited, load = 0.0, None
    while True:
        b0, o0 = busy_seconds(), own_seconds()
        time.sleep(1.0)
        load = foreign_cores(b0, o0, 1.0)
        if load is None or load < threshold or waited >= limit:
            return waited, load
        waited += 1.0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vmap_run(spec, k, x, y, batch, steps, device):
    """Trains k fresh members for `steps` steps with the vmap recipe. Returns the seconds, the mean loss
    (over steps and members), and this process's and other processes' CPU use meanwhile, in cores."""
    models = [module_from_arch(spec).to(device).train() for _ in range(k)]
    base = copy.deepcopy(models[0]).to("meta")

    def forward(params, buffers, xb):
        return functional_call(base, (params, buffers), (xb,))

    orders = torch.stack(
        [torch.randperm(steps * batch, generator=torch.Generator().manual_seed(m)) for m in range(k)]
    ).to(device)
    sync(device)
    busy0, own0 = busy_seconds(), own_seconds()
    start = time.perf_counter()
    params, buffers = stack_module_state(models)
    opt = torch.optim.SGD(params.values(), lr=0.01, momentum=0.9)
    batched = vmap(forward)
    total = torch.zeros((), device=device)
    for s in range(steps):
        ix = orders[:, s * batch : (s + 1) * batch]  # [K, N]
        xb, yb = x[ix], y[ix]  # [K, N, 1, 28, 28], [K, N]
        logits = batched(params, buffers, xb)  # [K, N, classes]
        per_member = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(k, -1).mean(1)
        loss = per_member.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach()
    sync(device)
    seconds = time.perf_counter() - start
    own = (own_seconds() - own0) / seconds
    return seconds, total.item() / (steps * k), own, foreign_cores(busy0, own0, seconds)


def nt_runs(preset, k, batch, steps, args, reverse):
    cmd = [
        JOINT_BENCH, "--arch", preset, "--k", str(k), "--batch", str(batch), "--steps", str(steps),
        "--device", args.device, "--kernels", args.kernels, "--repeats", str(args.repeats),
        "--warmup-steps", str(args.warmup_steps), "--threads", str(args.threads),
    ]
    if reverse:
        cmd.append("--reverse")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def vmap_runs(preset, spec, k, batch, steps, args, data):
    device = torch.device(args.device)
    x, y = data
    warm = min(args.warmup_steps, steps)
    if warm:
        vmap_run(spec, k, x, y, batch, warm, device)
    rows = []
    for r in range(args.repeats):
        seconds, loss, own, foreign = vmap_run(spec, k, x, y, batch, steps, device)
        samples = k * batch * steps
        rows.append({
            "arch": preset, "k": k, "batch": batch, "steps": steps, "device": args.device,
            "threads": torch.get_num_threads(), "mode": "vmap", "kernels": "torch.func", "repeat": r,
            "samples": samples, "seconds": seconds, "samples_per_second": samples / seconds,
            "mean_loss": loss, "own_cores": own, "foreign_cores": foreign,
        })
    return rows


def median_rate(runs, mode, kernels, quiet):
    """The median rate of a mode over the measurements during which other processes used under `quiet`
    cores, or over all of them where none was that quiet; and whether contended ones were kept."""
    mine = [r for r in runs if r["mode"] == mode and r["kernels"] == kernels]
    calm = [r for r in mine if r.get("foreign_cores") is None or r["foreign_cores"] < quiet]
    kept = calm or mine
    if not kept:
        return None, False
    return statistics.median(r["samples_per_second"] for r in kept), not calm


def target(device, model, k, joint_seq, joint_vmap, cpu_floor):
    """The issue's target for this row: (text, met) or None where it sets none."""
    if device == "cpu":
        return f"joint/seq >= {cpu_floor}", joint_seq >= cpu_floor
    if model in ("mlp", "lenet") and k == 8:
        return "joint/seq >= 4, joint/vmap >= 1.2", joint_seq >= 4 and joint_vmap >= 1.2
    if model == "resnet18" and k == 4:
        return "joint/seq >= 1.2", joint_seq >= 1.2
    return None


def fmt(v, width, digits, suffix=""):
    return ("-" if v is None else f"{v:.{digits}f}{suffix}").rjust(width)


def device_tag(device):
    if device == "cpu":
        return f"cpu{os.cpu_count()}"
    name = torch.cuda.get_device_name(0).lower().split()
    return name[-1] if name else "cuda"


def joint_kernels(args):
    """The kernels the joint column and the target read (nt's default on the device, Kernels::for_device,
    unless one kind alone was asked for), and the other kind where it is measured too (else None)."""
    if args.kernels in ("batched", "per-member"):
        return args.kernels, None
    default, other = ("batched", "per-member") if args.device == "cuda" else ("per-member", "batched")
    both = args.kernels == "both" or args.device == "cpu"
    return default, other if both else None


def summarize(name, preset, k, batch, steps, got, args):
    """One table row from one configuration's measurements."""
    kernels, other = joint_kernels(args)
    medians = {
        side: median_rate(got, mode, kind, args.quiet)
        for side, mode, kind in [("seq", "sequential", "single"), ("joint", "joint", kernels),
                                 ("joint2", "joint", other), ("vmap", "vmap", "torch.func")]
    }
    seq, joint, joint2, vm = (medians[s][0] for s in ("seq", "joint", "joint2", "vmap"))
    js = joint / seq if joint and seq else None
    jv = joint / vm if joint and vm else None
    goal = target(args.device, name, k, js or 0, jv or 0, args.cpu_floor)
    return {"model": name, "preset": preset, "k": k, "batch": batch, "steps": steps,
            "sequential": seq, "joint": joint, "joint_kernels": kernels,
            "joint_other": joint2, "joint_other_kernels": other, "vmap": vm,
            "joint_over_sequential": js, "joint_over_vmap": jv,
            "joint_other_over_sequential": joint2 / seq if joint2 and seq else None,
            "target": goal[0] if goal else None, "met": goal[1] if goal else None,
            "contended": [s for s, (_, c) in medians.items() if c]}


HEADER = (f"{'model':<9} {'K':>2} {'batch':>5} {'steps':>5} {'seq/s':>9} {'joint/s':>9} {'joint2/s':>9} "
          f"{'vmap/s':>9} {'joint/seq':>9} {'joint/vmap':>10} {'joint2/seq':>10}  target")


def table_line(r):
    verdict = "" if r["target"] is None else f"{r['target']}: {'met' if r['met'] else 'MISSED'}"
    if r["contended"]:
        verdict += f" (contended: {', '.join(r['contended'])})"
    return (f"{r['model']:<9} {r['k']:>2} {r['batch']:>5} {r['steps']:>5} {fmt(r['sequential'], 9, 0)} "
            f"{fmt(r['joint'], 9, 0)} {fmt(r['joint_other'], 9, 0)} {fmt(r['vmap'], 9, 0)} "
            f"{fmt(r['joint_over_sequential'], 9, 2, 'x')} {fmt(r['joint_over_vmap'], 10, 2, 'x')} "
            f"{fmt(r['joint_other_over_sequential'], 10, 2, 'x')}  {verdict}")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--k", default="2,4,8", help="ensemble sizes, comma-separated")
    ap.add_argument("--models", default="mlp,lenet,resnet18")
    ap.add_argument("--steps", type=int, help="steps per member (default: per model and device, see MODELS)")
    ap.add_argument("--batch", type=int, help="batch size per member (default: per model and device)")
    ap.add_argument("--repeats", type=int, default=3, help="measurements of every mode; medians are compared")
    ap.add_argument("--warmup-steps", type=int, default=2, help="steps per member of each mode's warm-up run")
    ap.add_argument("--kernels", default="auto", choices=["auto", "both", "batched", "per-member"],
                    help="nt's joint kernels (auto: both on the CPU, batched on CUDA)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads, both sides")
    ap.add_argument("--quiet", type=float, default=0.25,
                    help="other processes' CPU use (cores) under which a measurement counts as uncontended")
    ap.add_argument("--quiet-wait", type=float, default=60,
                    help="seconds to wait, before each CPU configuration, for the machine to be that quiet")
    ap.add_argument("--cpu-floor", type=float, default=0.95, help="the CPU target: joint/sequential at least this")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", help="file name tag (default: cpu<cores> or the GPU's name)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible to PyTorch")
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        sys.exit(f"unknown model(s) {', '.join(sorted(unknown))} (known: {', '.join(MODELS)})")
    return args


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    kernels, other = joint_kernels(args)
    started = datetime.datetime.now(datetime.timezone.utc)
    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    say(f"{started:%Y-%m-%d %H:%M} UTC, {platform.node()}, {args.device}"
        + (f" ({gpu})" if gpu else f", {os.cpu_count()} cores")
        + f", {args.threads} threads, torch {torch.__version__}")
    say(f"repeats {args.repeats} (medians), warm-up {args.warmup_steps} steps, lr 0.01, momentum 0.9; "
        f"joint = {kernels} kernels" + (f", joint2 = {other}" if other else ""))
    say(HEADER)
    runs, rows = [], []
    config = 0
    for name in args.models.split(","):
        preset, sizes = MODELS[name]
        batch, steps = sizes[args.device]
        batch, steps = args.batch or batch, args.steps or steps
        spec = arch_spec(preset)
        data = fashion(batch * steps, torch.device(args.device))
        for k in (int(k) for k in args.k.split(",")):
            waited, foreign = wait_quiet(args.quiet_wait, args.quiet) if args.device == "cpu" else (0.0, None)
            # Alternate which side goes first, so drift in the machine's speed cancels out.
            flip = config % 2 == 1
            config += 1
            sides = [
                lambda: nt_runs(preset, k, batch, steps, args, reverse=flip),
                lambda: vmap_runs(preset, spec, k, batch, steps, args, data),
            ]
            got = []
            for side in reversed(sides) if flip else sides:
                got += side()
            for r in got:
                r["model"] = name
            runs += got
            row = summarize(name, preset, k, batch, steps, got, args)
            row.update(foreign_cores_before=foreign, waited_for_quiet=waited)
            rows.append(row)
            say(table_line(row))
            # After every row, so a run cut short by a time limit keeps what it measured.
            save(args, started, gpu, lines, rows, runs)
    finished = datetime.datetime.now(datetime.timezone.utc)
    say("(samples/s: all members' training samples over the wall time of their training; medians over the "
        f"measurements while other processes used < {args.quiet} cores, where there were any; "
        f"{(finished - started).seconds} s in all)")
    stem = save(args, started, gpu, lines, rows, runs, finished)
    if stem:
        print(f"wrote {stem}.json and .txt")


def save(args, started, gpu, lines, rows, runs, finished=None):
    """Writes the table (.txt) and every measurement (.json); returns the files' stem (None with --no-write)."""
    if args.no_write:
        return None
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"joint-{started:%Y-%m-%d}-{args.tag or device_tag(args.device)}")
    meta = {"started": started.isoformat(), "finished": finished and finished.isoformat(),
            "host": platform.node(), "device": args.device, "gpu": gpu, "cores": os.cpu_count(),
            "threads": args.threads, "torch": torch.__version__, "argv": sys.argv[1:], "repeats": args.repeats,
            "warmup_steps": args.warmup_steps, "cpu_floor": args.cpu_floor, "quiet": args.quiet}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "runs": runs}, f, indent=1)
    with open(stem + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    return stem


if __name__ == "__main__":
    main()
