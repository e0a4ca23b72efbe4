"""The ablation report of a Tune search: one row per trial and the mean AP per option value,
as CSV, Markdown and a bar plot (written by ``tune.py`` at the end of a search)."""

from __future__ import annotations

import json
import os
from typing import Any

from workflows.coco_metrics import VAL_METRIC


def write_ablation_report(rows: list[dict[str, Any]], keys: list[str], out_dir: str) -> None:
    """``ablation.csv``, ``ablation.md`` and ``ablation.png`` (AP per option value)."""
    import csv

    os.makedirs(out_dir, exist_ok=True)
    columns = [
        "trial",
        *keys,
        "status",
        "epochs",
        VAL_METRIC,
        "val_occluded_segm_ap",
        "train_seconds",
        "parameters",
    ]
    with open(os.path.join(out_dir, "ablation.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if v != v else f"{v:.4f}" if abs(v) < 10 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in sorted(
        rows, key=lambda r: -(r[VAL_METRIC] if r[VAL_METRIC] == r[VAL_METRIC] else -1)
    ):
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    # Per option: the mean AP of the trials that used each value (the paper's ablation view).
    lines.append("")
    lines.append("| option | value | trials | mean val AP | mean occluded AP |")
    lines.append("|---|---|---|---|---|")
    per_option = []
    for key in keys:
        for value in sorted({json.dumps(r.get(key)) for r in rows}):
            sel = [r for r in rows if json.dumps(r.get(key)) == value and r["status"] != "ERROR"]
            aps = [r[VAL_METRIC] for r in sel if r[VAL_METRIC] == r[VAL_METRIC]]
            occ = [
                r["val_occluded_segm_ap"]
                for r in sel
                if r["val_occluded_segm_ap"] == r["val_occluded_segm_ap"]
            ]
            mean_ap = sum(aps) / len(aps) if aps else float("nan")
            mean_occ = sum(occ) / len(occ) if occ else float("nan")
            per_option.append((f"{key}={json.loads(value)}", mean_ap, mean_occ))
            lines.append(
                f"| {key} | {json.loads(value)} | {len(sel)} | {fmt(mean_ap)} | {fmt(mean_occ)} |"
            )
    with open(os.path.join(out_dir, "ablation.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(per_option)), 3.5))
    labels = [p[0] for p in per_option]
    xs = range(len(per_option))
    ax.bar(
        [x - 0.2 for x in xs],
        [0 if p[1] != p[1] else p[1] for p in per_option],
        width=0.4,
        label="val AP",
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [0 if p[2] != p[2] else p[2] for p in per_option],
        width=0.4,
        label="occluded AP",
    )
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("segm AP (mean over trials)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "ablation.png"), dpi=100)
    plt.close(fig)
