#!/usr/bin/env python3
"""The paper's claim on real data: NT after fine-tuning beats the best member.

Protocol (the paper's, as the reference code ran it here): Fashion-MNIST,
K = 2 members trained 10 epochs with SGD lr 0.01, momentum 0.9, batch 256,
constant rate, each with its own seed; fused with NT and with weight
averaging; each fused model fine-tuned 10 epochs with the same optimiser.
Everything goes through `ntctl` (train, fuse, eval), as a user would run it.

    python3 bench/reproduce_paper.py [--models mlp,lenet] [--epochs 10] [--device auto]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NTCTL = os.environ.get("NTCTL", os.path.join(ROOT, "target", "release", "ntctl"))

# What the paper's reference code reached on this protocol (MLP, 2 CPU cores).
PAPER = {
    "mlp": {
        "member 0": 88.2, "member 1": 88.6, "ensemble": 88.8,
        "nt": 87.4, "nt + fine-tuning": 89.0,
        "average": 67.4, "average + fine-tuning": 88.8,
    },
}

ARCHS = {"mlp": "mlp", "lenet": "lenet"}


def ntctl(*args):
    out = subprocess.run([NTCTL, "--output", "json", *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"ntctl {' '.join(args)} failed:\n{out.stderr}")
    return json.loads(out.stdout)


def run(model, epochs, device, folder, seeds):
    arch = ARCHS[model]
    common = ["--epochs", str(epochs), "--lr", "0.01", "--momentum", "0.9", "--batch-size", "256", "--device", device]
    rows = {}
    members = []
    for i, seed in enumerate(seeds):
        path = os.path.join(folder, f"{model}-member{i}.safetensors")
        report = ntctl("train", "--arch", arch, "--seed", str(seed), *common, "-o", path)
        rows[f"member {i}"] = 100 * report["test"]["accuracy"]
        members.append(path)
    rows["ensemble"] = 100 * ntctl("eval", "--device", device, *members)["ensemble"]["accuracy"]
    for method in ["nt", "average"]:
        fused = os.path.join(folder, f"{model}-{method}.safetensors")
        ntctl("fuse", "--method", method, "-o", fused, *members)
        rows[method] = 100 * ntctl("eval", "--device", device, fused)["models"][0]["accuracy"]
        tuned = os.path.join(folder, f"{model}-{method}-ft.safetensors")
        report = ntctl("train", "--init", fused, "--seed", "1000", *common, "-o", tuned)
        rows[f"{method} + fine-tuning"] = 100 * report["test"]["accuracy"]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,lenet")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seeds", default="1,2", help="member seeds")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="nt-paper-") as folder:
        for model in args.models.split(","):
            start = time.time()
            rows = run(model, args.epochs, args.device, folder, seeds)
            results[model] = rows
            paper = PAPER.get(model, {})
            print(f"\n{model}: Fashion-MNIST, K = {len(seeds)}, {args.epochs} + {args.epochs} epochs "
                  f"({time.time() - start:.0f} s)")
            print(f"{'':<24} {'nt %':>7} {'paper %':>8}")
            for name, acc in rows.items():
                ref = f"{paper[name]:.1f}" if name in paper else "-"
                print(f"{name:<24} {acc:>7.2f} {ref:>8}")
            best = max(v for k, v in rows.items() if k.startswith("member"))
            verdict = "beats" if rows["nt + fine-tuning"] > best else "does NOT beat"
            print(f"NT after fine-tuning {verdict} the best member ({rows['nt + fine-tuning']:.2f} vs {best:.2f})",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
