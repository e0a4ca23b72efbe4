"""Robustness to pose-estimator errors: segm AP of one or more models as the GT keypoints they
are given are degraded (``eval.keypoint_drop_prob`` / ``eval.keypoint_jitter``, seeded; see
``pose2seg/keypoint_noise.py``), through the same path as ``evaluate.py`` (Ray Data batch
inference, pycocotools, ``eval.protocol``).

python benchmarks/robustness_eval.py --model ours=runs/RUN/checkpoint_X \\
    --model ours+occlusion=models:/pose2seg@champion --report-dir docs/robustness

Levels (``--levels``, ``DROP:JITTER`` each) default to misses alone, localisation error alone,
and both. Writes ``robustness.md`` / ``.csv`` / ``.png`` to ``--report-dir`` and the figures as
JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

DEFAULT_LEVELS = ["0:0", "0.1:0", "0.2:0", "0.4:0", "0:0.25", "0:0.5", "0:1", "0.2:0.5"]


def parse_levels(values: list[str]) -> list[tuple[float, float]]:
    levels = []
    for value in values:
        try:
            drop, jitter = (float(x) for x in value.split(":"))
        except ValueError:
            raise SystemExit(f"--levels: expected DROP:JITTER, got {value!r}") from None
        levels.append((drop, jitter))
    return levels


def parse_models(values: list[str]) -> dict[str, str]:
    models = {}
    for value in values:
        name, sep, ref = value.partition("=")
        if not sep or not name or not ref:
            raise SystemExit(f"--model: expected NAME=MODEL_REF, got {value!r}")
        models[name] = ref
    return models


def _count(results_path: str) -> int:
    import json

    with open(results_path) as fh:
        return len(json.load(fh))


def write_report(rows: list[dict], out_dir: str, *, title: str) -> None:
    """``robustness.csv``, ``robustness.md`` (a table: level x model) and ``robustness.png``."""
    os.makedirs(out_dir, exist_ok=True)
    keys = ["model", "drop", "jitter", "segm_ap", "segm_ap50", "occluded_segm_ap", "predicted"]
    with open(os.path.join(out_dir, "robustness.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: r[k] for k in keys} for r in rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    levels = list(dict.fromkeys((r["drop"], r["jitter"]) for r in rows))
    ap = {(r["model"], r["drop"], r["jitter"]): r for r in rows}
    lines = [
        f"# {title}",
        "",
        "| keypoints dropped | jitter (OKS units) | "
        + " | ".join(f"{m} AP / occluded AP" for m in models)
        + " |",
        "|---:|---:|" + "---:|" * len(models),
    ]
    for drop, jitter in levels:
        cells = [
            f"{ap[(m, drop, jitter)]['segm_ap']:.3f} / {ap[(m, drop, jitter)]['occluded_segm_ap']:.3f}"
            for m in models
        ]
        lines.append(f"| {drop:g} | {jitter:g} | " + " | ".join(cells) + " |")
    with open(os.path.join(out_dir, "robustness.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for m in models:
        drops = sorted({d for d, j in levels if j == 0})
        jitters = sorted({j for d, j in levels if d == 0})
        axes[0].plot(drops, [ap[(m, d, 0.0)]["segm_ap"] for d in drops], marker="o", label=m)
        axes[1].plot(jitters, [ap[(m, 0.0, j)]["segm_ap"] for j in jitters], marker="o", label=m)
    axes[0].set_xlabel("share of visible keypoints dropped (hidden: twice)")
    axes[1].set_xlabel("keypoint jitter (OKS units)")
    for ax in axes:
        ax.set_ylabel("val segm AP")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "robustness.png"), dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, "robustness_eval")
    parser.add_argument(
        "--model", action="append", required=True, help="NAME=MODEL_REF (repeatable)"
    )
    parser.add_argument("--levels", nargs="+", default=DEFAULT_LEVELS, help="DROP:JITTER ...")
    parser.add_argument("--split", default="val")
    parser.add_argument("--report-dir", default=None, help="where the tables and plot go")
    args = parser.parse_args(argv)
    models, levels = parse_models(args.model), parse_levels(args.levels)
    config = common.config_from_args(args)
    machine = common.machine_info()
    common.print_header("robustness to degraded keypoints", machine)
    common.start_ray(num_cpus=os.cpu_count() or 2)

    from workflows.evaluate import run_evaluate_splits

    rows = []
    for name, ref in models.items():
        for drop, jitter in levels:
            cfg = config.with_overrides(
                {"eval.keypoint_drop_prob": drop, "eval.keypoint_jitter": jitter}
            )
            out = run_evaluate_splits(cfg, model_ref=ref, splits=[args.split], log_to_mlflow=False)
            res = out.splits[args.split]
            row = {
                "model": name,
                "model_ref": ref,
                "drop": drop,
                "jitter": jitter,
                "segm_ap": res.metrics["segm_ap"],
                "segm_ap50": res.metrics["segm_ap50"],
                "occluded_segm_ap": res.metrics["occluded_segm_ap"],
                "predicted": _count(res.results_path),
            }
            rows.append(row)
            print(
                f"{name:<20} drop {drop:<4g} jitter {jitter:<4g} segm AP {row['segm_ap']:.4f}  "
                f"occluded AP {row['occluded_segm_ap']:.4f}",
                flush=True,
            )
    report_dir = args.report_dir or os.path.join(os.path.dirname(args.out), "robustness")
    write_report(
        rows,
        report_dir,
        title=(
            f"segm AP on {args.split} with degraded GT keypoints "
            f"(seed {config.eval.keypoint_noise_seed}, protocol {config.eval.protocol})"
        ),
    )
    print(f"report: {report_dir}")
    print("wrote", common.write_json(args.out, {"rows": rows}, machine=machine))
    return 0


if __name__ == "__main__":
    common.main_guard(main)
