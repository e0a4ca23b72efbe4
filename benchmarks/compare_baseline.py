"""Pose2Seg against the torchvision Mask R-CNN baseline, same data, config and training budget.

Both models are trained by the same Ray Train + MLflow job (``workflows.train_driver.run_training``,
the code behind ``workflows/train.py``), differing only in ``model.arch``: same epochs, batch
size, workers, optimiser and schedule, same Parquet data, same backbone depth and FPN width,
evaluated by the same pycocotools code on the same val split with GT keypoints for Pose2Seg.
Prints and writes (``--out``) for each: overall val segm AP (best epoch and last epoch), AP50,
the occluded-subset AP (people with MaxIoU >= ``eval.occluded_min_iou``, 0.5 by default) and
the wall time of the training job (data preprocessing is done once, before either clock starts).
Neither model is registered: the comparison never moves the ``champion`` alias.

    python benchmarks/compare_baseline.py --out compare_baseline.json      # the default budget
    python benchmarks/compare_baseline.py --set train.epochs=2 \\
        --set data.synthetic_num_train=64 --set data.synthetic_num_val=32 --out quick.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pose2seg.config import Config  # noqa: E402
from workflows.cli import add_config_args, config_from_args, init_ray, run_main  # noqa: E402

ARCHS: tuple[str, ...] = ("pose2seg", "maskrcnn")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument("--out", help="write the comparison as JSON to this path")
    parser.add_argument(
        "--archs",
        default=",".join(ARCHS),
        help=f"comma-separated archs to train, in order (default: {','.join(ARCHS)})",
    )
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)"
    )
    return parser


def _finite(value: Any) -> float | None:
    """JSON-safe float: NaN (COCOeval's 'no ground truth in this range') becomes null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def summarise(outcome: Any, *, wall_s: float) -> dict[str, Any]:
    """The comparison figures of one training job (a ``workflows.train_driver.TrainOutcome``)."""
    m = outcome.metrics
    history = outcome.history or []
    best_epoch = m.get("best_epoch")
    best_row = next((h for h in history if int(h.get("epoch", -1)) == best_epoch), {})
    return {
        "best_epoch": best_epoch,
        "best_val_segm_ap": _finite(m.get("best_val_segm_ap")),
        "best_epoch_val_occluded_segm_ap": _finite(best_row.get("val_occluded_segm_ap")),
        "last_val_segm_ap": _finite(m.get("val_segm_ap")),
        "last_val_segm_ap50": _finite(m.get("val_segm_ap50")),
        "last_val_occluded_segm_ap": _finite(m.get("val_occluded_segm_ap")),
        "last_train_loss": _finite(m.get("train_loss")),
        "epochs": int(m.get("epoch", 0)),
        "val_num_images": _finite(m.get("val_num_images")),
        "val_num_people": _finite(m.get("val_num_people")),
        "wall_s": round(wall_s, 1),
        "mlflow_run_id": outcome.mlflow_run_id,
        "run_name": outcome.run_name,
    }


def compare(config: Config, *, archs: tuple[str, ...] = ARCHS) -> dict[str, dict[str, Any]]:
    """Train each arch with ``config`` (only ``model.arch`` differs) on an initialised Ray."""
    from workflows.train_driver import new_run_name, prepare_data, run_training

    # Preprocess once (arch is not a preprocessing key: both read the same Parquet variant),
    # so neither wall time includes it.
    prepare_data(config)
    results: dict[str, dict[str, Any]] = {}
    for arch in archs:
        arch_config = config.with_overrides(
            {"model.arch": arch, "train.run_name": new_run_name(f"compare-{arch}")}
        )
        print(f"[compare] training {arch}", flush=True)
        start = time.perf_counter()
        outcome = run_training(arch_config, register=False)
        results[arch] = summarise(outcome, wall_s=time.perf_counter() - start)
    return results


def _fmt(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.4f}"


def print_table(config: Config, results: dict[str, dict[str, Any]]) -> None:
    t, d = config.train, config.data
    print()
    print(
        f"budget: {t.epochs} epochs, {t.num_workers} workers x batch {t.batch_size}, "
        f"{d.synthetic_num_train} train / {d.synthetic_num_val} val images ({d.source}), "
        f"input {d.input_size}, ResNet-{config.model.backbone_depth}-FPN-{config.model.fpn_channels}"
    )
    occ = config.eval.occluded_min_iou
    print(
        f"{'arch':<10} {'AP best':>8} {'(epoch)':>7} {'AP last':>8} {'AP50':>7} "
        f"{'occl. AP':>8} {'wall s':>8}   (occluded: MaxIoU >= {occ}, last epoch)"
    )
    for arch, r in results.items():
        print(
            f"{arch:<10} {_fmt(r['best_val_segm_ap']):>8} {str(r['best_epoch']):>7} "
            f"{_fmt(r['last_val_segm_ap']):>8} {_fmt(r['last_val_segm_ap50']):>7} "
            f"{_fmt(r['last_val_occluded_segm_ap']):>8} {r['wall_s']:>8.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    archs = tuple(a.strip() for a in args.archs.split(",") if a.strip())
    unknown = [a for a in archs if a not in ARCHS]
    if not archs or unknown:
        print(f"--archs: unknown {unknown}, choose from {list(ARCHS)}", file=sys.stderr)
        return 2
    init_ray(args.address, num_cpus=args.num_cpus)
    results = compare(config, archs=archs)
    print_table(config, results)
    if args.out:
        report = {
            "command": " ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])]),
            "config_file": args.config,
            "overrides": args.overrides,
            "machine": {
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "use_gpu": config.train.use_gpu,
            },
            "results": results,
        }
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
