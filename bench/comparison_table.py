#!/usr/bin/env python3
"""The README's tables of the paper's comparison, from the summaries that
`ntctl experiment` wrote (`make bench-comparison`).

    python3 bench/comparison_table.py bench/results/paper-comparison/{mlp,lenet}/summary.json

Per architecture, one row per model and, per member count K, the test
accuracy right after fusion, the first fine-tuning epoch reaching the best
member (mean over the seeds that reached it, with how many did), and the
final accuracy, as mean ± standard deviation over seeds in %.
"""

import json
import sys


def pct(s):
    return "-" if s is None else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def epochs(t, seeds):
    s = t["epochs_to_best_member"]
    if s is None:
        return f"– (0/{seeds})"
    if t["reached"] == seeds:
        return f"{s['mean']:.1f}"
    return f"{s['mean']:.1f} ({t['reached']}/{seeds})"


def table(summary):
    groups = summary["groups"]
    ks = [g["members"] for g in groups]
    head = "| model | " + " | ".join(
        f"K={k} after fusion | K={k} epochs to best | K={k} final" for k in ks
    )
    out = [f"**{summary['name']}** ({groups[0]['seeds']} seeds)", "", head + " |",
           "| --- |" + " ---: | ---: | ---: |" * len(ks)]
    for label, key in [("best member", "best_member"), ("mean member", "mean_member"),
                       ("ensemble", "ensemble")]:
        cells = " | ".join(f" | | {pct(g[key])}" for g in groups)
        out.append(f"| {label} | {cells} |")
    names = [t["name"] for t in groups[0]["tuned"]]
    for name in names:
        cells = []
        for g in groups:
            t = next(t for t in g["tuned"] if t["name"] == name)
            cells.append(f"{pct(t['start'])} | {epochs(t, g['seeds'])} | {pct(t['end'])}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append("")
    # Fusion cost, per K: time and peak memory of each method.
    out.append("| fusion cost | " + " | ".join(f"K={k} seconds | K={k} peak MiB" for k in ks) + " |")
    out.append("| --- |" + " ---: | ---: |" * len(ks))
    for name in names:
        if name.endswith("(distilled)") or name == "baseline":
            continue
        cells = []
        for g in groups:
            t = next(t for t in g["tuned"] if t["name"] == name)
            sec = t["fusion_seconds"]
            peak = t["fusion_peak_bytes"]
            cells.append(("-" if sec is None else f"{sec['mean']:.3f}") + " | "
                         + ("-" if peak is None else f"{peak['mean'] / 2**20:.1f}"))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main():
    for path in sys.argv[1:]:
        with open(path) as f:
            print(table(json.load(f)))
            print()


if __name__ == "__main__":
    main()
