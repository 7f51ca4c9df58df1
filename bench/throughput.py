#!/usr/bin/env python3
"""Training throughput: `ntctl train` against PyTorch eager, same model, batch
size, thread count and data strategy, run by this one script on one machine.

Both sides keep a synthetic data set on the device, shuffle it every epoch and
gather each batch by index, then run forward, cross-entropy, backward and an
SGD step (lr 0.01, momentum 0.9). nt's figure is the samples per second of its
last training epoch as `ntctl --output json train` reports it; PyTorch's is
timed the same way over its last epoch (after a warm-up epoch), synchronising
the GPU before reading the clock. Each side is measured --repeat times,
alternating, and the medians are compared (CPU timings on a shared machine
vary by several per cent from run to run).

    python3 bench/throughput.py [--device cpu|cuda|both] [--models mlp,lenet,resnet18]
"""

import argparse
import json
import statistics
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_models import preset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NTCTL = os.environ.get("NTCTL", os.path.join(ROOT, "target", "release", "ntctl"))

# name: (nt preset, PyTorch module, sample shape, samples per epoch on cpu / cuda)
MODELS = {
    "mlp": ("mlp", lambda: preset("mlp"), (1, 28, 28), (16384, 262144)),
    "lenet": ("lenet", lambda: preset("lenet"), (1, 28, 28), (8192, 262144)),
    "resnet18": ("resnet18", lambda: preset("resnet18"), (3, 32, 32), (1024, 32768)),
}


def torch_throughput(make, shape, samples, batch, device, epochs, bf16):
    torch.manual_seed(0)
    model = make().to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(samples, *shape, device=device)
    y = torch.randint(0, 10, (samples,), device=device)
    rate = 0.0
    for _ in range(epochs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        order = torch.randperm(samples, device=device)
        for i in range(0, samples, batch):
            idx = order[i : i + batch]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = samples / (time.perf_counter() - start)
    return rate


def nt_throughput(preset, shape, samples, batch, device, epochs, bf16, threads):
    with tempfile.TemporaryDirectory() as tmp:
        data = "synthetic:shape={},train={},test=256,classes=10".format("x".join(map(str, shape)), samples)
        cmd = [
            NTCTL, "--output", "json", "train", "--arch", preset, "--data", data,
            "--epochs", str(epochs), "--batch-size", str(batch), "--lr", "0.01", "--momentum", "0.9",
            "--device", device, "--threads", str(threads), "-o", os.path.join(tmp, "m.safetensors"),
        ]
        if bf16:
            cmd.append("--bf16")
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        return json.loads(out.stdout)["history"][-1]["samples_per_second"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="both", choices=["cpu", "cuda", "both"])
    ap.add_argument("--models", default="mlp,lenet,resnet18")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per side; the last one is timed")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on the GPU (both sides)")
    ap.add_argument("--repeat", type=int, default=3, help="measurements per side, alternating; the median is kept")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "both" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            sys.exit("no CUDA device visible to PyTorch")
        devices.remove("cuda")
    rows = []
    print(f"threads {args.threads}, batch {args.batch}, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(0)}" if "cuda" in devices else ""))
    print(f"{'model':<10} {'device':<6} {'nt samples/s':>13} {'torch samples/s':>16} {'nt/torch':>9}", flush=True)
    for name in args.models.split(","):
        preset, make, shape, (cpu_n, gpu_n) = MODELS[name]
        for dev in devices:
            samples = cpu_n if dev == "cpu" else gpu_n
            bf16 = args.bf16 and dev == "cuda"
            ours, theirs = [], []
            for r in range(args.repeat):
                # Alternate which side goes first, so drift in the machine's speed cancels out.
                sides = [
                    lambda: ours.append(nt_throughput(preset, shape, samples, args.batch, dev, args.epochs, bf16, args.threads)),
                    lambda: theirs.append(torch_throughput(make, shape, samples, args.batch, torch.device(dev), args.epochs, bf16)),
                ]
                for side in sides if r % 2 == 0 else reversed(sides):
                    side()
            ours, theirs = statistics.median(ours), statistics.median(theirs)
            rows.append({"model": name, "device": dev, "bf16": bf16, "nt": ours, "torch": theirs, "ratio": ours / theirs})
            print(f"{name:<10} {dev:<6} {ours:>13.0f} {theirs:>16.0f} {ours / theirs:>8.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
