#!/usr/bin/env python3
"""Image-folder decoding: nt against torchvision's ImageFolder, same files,
same transform, run by this one script on one machine.

The 70,000 Fashion-MNIST images are written once as PNG files in the
image-folder layout (`ntctl data export`). Then, --repeat times, alternating:

- torchvision: `ImageFolder(train)` and `ImageFolder(test)` with
  `Resize(28)`, `CenterCrop(28)`, `Grayscale(1)` and `PILToTensor()`, read
  through a `DataLoader` with 2 workers (batch 256) and concatenated into one
  uint8 tensor per split: the decoded set, as nt builds it.
- nt, cold: `ntctl data load --data image-folder:DIR --arch mlp` with an
  empty cache folder: lists, decodes, resizes, crops and stores the decoded
  cache.
- nt, cached: the same command again: the listing is hashed and the decoded
  set read from the cache.

nt's figures are the load's own seconds as `ntctl --output json data load`
reports them (listing, decoding, cache); the process's wall time, which adds
loading libtorch and ntctl's start, is printed beside them. Medians are
compared.

    python3 bench/image_folder.py [--repeat 3] [--dir /tmp/nt-fm-png] [--json out.json]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NTCTL = os.environ.get("NTCTL", os.path.join(ROOT, "target", "release", "ntctl"))


def export(folder):
    marker = os.path.join(folder, ".complete")
    if os.path.exists(marker):
        return
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run(
        [NTCTL, "data", "export", "--format", "image-folder", "--out", folder],
        check=True,
    )
    open(marker, "w").close()


def torchvision_decode(folder, workers):
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.Resize(28),
            transforms.CenterCrop(28),
            transforms.Grayscale(1),
            transforms.PILToTensor(),
        ]
    )
    start = time.perf_counter()
    count = 0
    for split in ("train", "test"):
        ds = datasets.ImageFolder(os.path.join(folder, split), transform=transform)
        loader = DataLoader(ds, batch_size=256, num_workers=workers)
        xs, ys = [], []
        for x, y in loader:
            xs.append(x)
            ys.append(y)
        x = torch.cat(xs)
        count += x.shape[0]
    return time.perf_counter() - start, count


def nt_load(folder, cache):
    start = time.perf_counter()
    out = subprocess.run(
        [
            NTCTL, "--output", "json", "data", "load",
            "--data", f"image-folder:{folder}", "--arch", "mlp", "--cache-dir", cache,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    report = json.loads(out.stdout)
    load = report["load"]
    return load["seconds"], wall, load["cache_hit"], load["images"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "nt-fm-png"))
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()

    export(args.dir)
    cache = tempfile.mkdtemp(prefix="nt-data-cache-")
    tv, cold, cold_wall, warm, warm_wall = [], [], [], [], []
    try:
        for r in range(args.repeat):
            seconds, n = torchvision_decode(args.dir, args.workers)
            tv.append(seconds)
            shutil.rmtree(cache)
            os.makedirs(cache)
            s, w, hit, images = nt_load(args.dir, cache)
            assert not hit and images == n == 70000, (hit, images, n)
            cold.append(s)
            cold_wall.append(w)
            s, w, hit, _ = nt_load(args.dir, cache)
            assert hit
            warm.append(s)
            warm_wall.append(w)
            print(
                f"repeat {r + 1}: torchvision {tv[-1]:.2f} s, nt cold {cold[-1]:.2f} s "
                f"({cold_wall[-1]:.2f} s wall), nt cached {warm[-1]:.3f} s ({warm_wall[-1]:.2f} s wall)",
                flush=True,
            )
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    med = statistics.median
    rows = [
        ("torchvision ImageFolder + DataLoader", med(tv), None),
        ("nt: decode and build the cache", med(cold), med(cold_wall)),
        ("nt: cached reload", med(warm), med(warm_wall)),
    ]
    cores = os.cpu_count()
    print(f"\n70,000 PNG files, 28x28 grey, {cores} cores, DataLoader workers {args.workers}, median of {args.repeat}")
    print(f"| | seconds | process wall | vs torchvision |")
    print(f"| --- | --- | --- | --- |")
    for name, seconds, wall in rows:
        ratio = med(tv) / seconds
        wall_text = f"{wall:.2f}" if wall is not None else ""
        print(f"| {name} | {seconds:.3f} | {wall_text} | {ratio:.1f}x |")
    cold_ratio, warm_ratio = med(tv) / med(cold), med(tv) / med(warm)
    print(
        f"\ntargets: decode and cache at least 2x: {cold_ratio:.1f}x "
        f"({'met' if cold_ratio >= 2 else 'MISSED'}); cached reload at least 20x: "
        f"{warm_ratio:.1f}x ({'met' if warm_ratio >= 20 else 'MISSED'})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "cores": cores,
                    "workers": args.workers,
                    "torchvision_seconds": tv,
                    "nt_cold_seconds": cold,
                    "nt_cold_wall_seconds": cold_wall,
                    "nt_cached_seconds": warm,
                    "nt_cached_wall_seconds": warm_wall,
                    "ratio_cold": cold_ratio,
                    "ratio_cached": warm_ratio,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    sys.exit(main())
