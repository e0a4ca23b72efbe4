"""One ablation table over several seeds: the ``ablation.csv`` of each ``tune.py`` run of the
same named trials (one run per ``train.seed``) -> per trial the val AP of every seed, the mean,
the difference to a reference trial, and whether that difference exceeds the seed-to-seed
spread (the largest difference between two seeds of the same trial, over all trials).

python benchmarks/ablation_seeds.py outputs/ablation-paper-vs-ours/ablation.csv \\
    outputs/ablation-paper-vs-ours-seed1/ablation.csv --reference ours --report-dir docs/ablation
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METRIC = "val_segm_ap"
OCCLUDED = "val_occluded_segm_ap"


def read_runs(paths: list[str]) -> list[dict[str, dict[str, float]]]:
    """Per run: trial name -> {metric: value} (trials that did not finish OK are left out)."""
    runs = []
    for path in paths:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "variant" not in rows[0]:
            raise SystemExit(f"{path}: not the ablation.csv of a run of named trials (tune.trials)")
        runs.append(
            {
                r["variant"]: {METRIC: float(r[METRIC]), OCCLUDED: float(r[OCCLUDED])}
                for r in rows
                if r.get("status") == "OK"
            }
        )
    return runs


def combine(runs: list[dict[str, dict[str, float]]], *, reference: str) -> dict:
    """The per-trial rows and the seed-to-seed spread (see the module docstring)."""
    trials = [t for t in runs[0] if all(t in run for run in runs)]
    if reference not in trials:
        raise SystemExit(f"--reference {reference!r}: not a trial of every run ({trials})")
    per_trial = {t: [run[t][METRIC] for run in runs] for t in trials}
    spread = max(max(v) - min(v) for v in per_trial.values()) if len(runs) > 1 else float("nan")
    ref_mean = sum(per_trial[reference]) / len(runs)
    rows = []
    for t in trials:
        aps = per_trial[t]
        mean = sum(aps) / len(aps)
        occ = sum(run[t][OCCLUDED] for run in runs) / len(runs)
        delta = mean - ref_mean
        rows.append(
            {
                "trial": t,
                "aps": aps,
                "mean": mean,
                "occluded_mean": occ,
                "delta": delta,
                "beyond_spread": bool(len(runs) > 1 and t != reference and abs(delta) > spread),
            }
        )
    rows.sort(key=lambda r: -r["mean"])
    return {"rows": rows, "spread": spread, "reference": reference, "seeds": len(runs)}


def write_report(result: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    n = result["seeds"]
    lines = [
        "| trial | "
        + " | ".join(f"val AP seed {i}" for i in range(n))
        + f" | mean | occluded AP (mean) | vs {result['reference']} | beyond the spread |",
        "|---|" + "---:|" * (n + 3) + "---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['trial']} | "
            + " | ".join(f"{ap:.3f}" for ap in r["aps"])
            + f" | {r['mean']:.3f} | {r['occluded_mean']:.3f} | {r['delta']:+.3f} | "
            + ("yes" if r["beyond_spread"] else "no")
            + " |"
        )
    lines.append("")
    lines.append(
        f"Seed-to-seed spread (largest difference between two seeds of one trial): "
        f"{result['spread']:.3f} AP."
    )
    with open(os.path.join(out_dir, "ablation_seeds.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(rows)), 3.8))
    xs = list(range(len(rows)))
    ax.bar(xs, [r["mean"] for r in rows], color="#9ab", label="mean over seeds")
    for i in range(n):
        ax.scatter(xs, [r["aps"][i] for r in rows], s=14, zorder=3, label=f"seed {i}")
    ax.set_xticks(xs)
    ax.set_xticklabels([r["trial"] for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("best val segm AP")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "ablation_seeds.png"), dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="+", help="ablation.csv of each seed's tune.py run")
    parser.add_argument("--reference", default="ours", help="the trial differences are against")
    parser.add_argument("--report-dir", required=True)
    args = parser.parse_args(argv)
    result = combine(read_runs(args.csv), reference=args.reference)
    write_report(result, args.report_dir)
    with open(os.path.join(args.report_dir, "ablation_seeds.md")) as fh:
        print(fh.read())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
