"""Benchmark of our evaluation against pycocotools alone (a script, not a test).

Ground truth: the config's preprocessed val split as evaluation sees it
(``preprocessing.schema.gt_to_coco``: visible masks, crowd/ignore regions, each person's MaxIoU).
Results: the ground-truth masks perturbed (shifted, dilated or eroded, some people missed, some
false positives added, scores that loosely follow the damage), so the AP is neither 0 nor 1.
Timed on the same ground truth and results, median of ``--repeats`` after a warm-up:

1. pycocotools alone: ``COCO()`` from the dict + ``createIndex``, ``loadRes``, ``COCOeval(segm)``
   ``evaluate`` / ``accumulate`` / ``summarize``;
2. ours: ``workflows.coco_metrics.coco_segm_metrics`` (the same, behind copies and checks) and
   ``occlusion_breakdown`` over ``eval.occlusion_bins`` (one COCOeval per MaxIoU bin).

The script asserts that the six AP figures of (1) and (2) are identical and prints both.

    python benchmarks/bench_eval.py --out /tmp/bench_eval.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

common.limit_threads_env()


# Largest shift of a perturbed mask, as a fraction of its box (thin synthetic limbs: small).
MAX_SHIFT = 0.08


def _shift(mask, dy: int, dx: int):
    import numpy as np

    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def _grow(mask, steps: int):
    """Dilate (steps > 0) or erode (steps < 0) by |steps| pixels, 4-neighbourhood."""
    for _ in range(abs(steps)):
        near = [_shift(mask, 1, 0), _shift(mask, -1, 0), _shift(mask, 0, 1), _shift(mask, 0, -1)]
        if steps > 0:
            mask = mask | near[0] | near[1] | near[2] | near[3]
        else:
            mask = mask & near[0] & near[1] & near[2] & near[3]
    return mask


def perturbed_results(gt: dict, *, seed: int, miss: float, false_positives: float) -> list[dict]:
    """COCO results made from the ground-truth masks, damaged at random (deterministic)."""
    import numpy as np
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    results = []
    people = [a for a in gt["annotations"] if not a.get("iscrowd", 0)]
    for ann in people:
        if rng.random() < miss:
            continue
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        _, _, bw, bh = ann["bbox"]
        fraction = rng.uniform(0.0, MAX_SHIFT)  # shift as a fraction of the box size
        dx = int(round(rng.choice([-1, 1]) * fraction * bw))
        dy = int(round(rng.choice([-1, 1]) * fraction * bh))
        damaged = _grow(_shift(mask, dy, dx), int(rng.integers(-1, 2)))
        score = float(np.clip(1.0 - fraction / MAX_SHIFT + rng.normal(0.0, 0.15), 0.01, 1.0))
        results.append(_result(ann["image_id"], damaged, score, mask_utils))
        if rng.random() < false_positives:
            far = _shift(mask, int(0.6 * bh) or 1, int(0.6 * bw) or 1)
            results.append(_result(ann["image_id"], far, float(rng.uniform(0.01, 0.6)), mask_utils))
    return results


def _result(image_id: int, mask, score: float, mask_utils) -> dict:
    import numpy as np

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "image_id": int(image_id),
        "category_id": 1,
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()},
        "score": score,
    }


def pycocotools_alone(gt: dict, results: list[dict]) -> list[float]:
    """The plain pycocotools recipe; returns COCOeval's first six stats (segm AP figures)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats[:6]]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, "bench_eval")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-images", type=int, default=0, help="first N val images (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbations")
    parser.add_argument("--miss", type=float, default=0.1, help="fraction of people missed")
    parser.add_argument(
        "--false-positives", type=float, default=0.2, help="extra wrong masks per person"
    )
    args = parser.parse_args(argv)
    config = common.config_from_args(args)

    from preprocessing.schema import gt_to_coco
    from workflows.coco_metrics import METRIC_NAMES, coco_segm_metrics, occlusion_breakdown

    machine = common.machine_info()
    common.print_header("evaluation: ours vs pycocotools alone", machine)
    common.ensure_preprocessed(config)
    rows = common.read_rows(config, "val", limit=args.max_images or None)
    gt = gt_to_coco(rows)
    results = perturbed_results(
        gt, seed=args.seed, miss=args.miss, false_positives=args.false_positives
    )
    people = sum(1 for a in gt["annotations"] if not a.get("iscrowd", 0))
    ignores = len(gt["annotations"]) - people
    print(
        f"{len(gt['images'])} val images, {people} people (+{ignores} ignore regions), "
        f"{len(results)} perturbed results",
        flush=True,
    )

    bins = config.eval.occlusion_bins
    # Fresh copies per call, made outside the clock: pycocotools adds fields to the result and
    # ground-truth dicts it is given (ours copies inside, and that cost is counted).
    copies = [
        (copy.deepcopy(gt), [dict(r) for r in results]) for _ in range(args.repeats + args.warmup)
    ]
    plain = common.repeat(
        lambda: pycocotools_alone(*copies.pop()), repeats=args.repeats, warmup=args.warmup
    )
    ours = common.repeat(
        lambda: coco_segm_metrics(gt, results), repeats=args.repeats, warmup=args.warmup
    )
    breakdown = common.repeat(
        lambda: occlusion_breakdown(gt, results, bins=bins),
        repeats=args.repeats,
        warmup=args.warmup,
    )

    plain_ap = [v if v >= 0 else math.nan for v in plain.results[-1]]
    ours_ap = [ours.results[-1][name] for name in METRIC_NAMES]
    print("AP figures          " + " ".join(f"{n[5:] or 'ap':>10s}" for n in METRIC_NAMES))
    print("pycocotools alone   " + " ".join(f"{v:10.4f}" for v in plain_ap))
    print("coco_segm_metrics   " + " ".join(f"{v:10.4f}" for v in ours_ap))
    identical = all(_same(a, b) for a, b in zip(plain_ap, ours_ap, strict=True))
    assert identical, f"AP differs: pycocotools {plain_ap} vs ours {ours_ap}"
    print("AP figures identical: yes", flush=True)
    for row in breakdown.results[-1]:
        print(f"  MaxIoU {row['bin']:12s} {row['num_people']:4d} people  AP {row['segm_ap']:.4f}")

    t_plain, t_ours, t_bins = plain.median_wall_s, ours.median_wall_s, breakdown.median_wall_s
    print(
        f"median of {args.repeats}: pycocotools alone {1000 * t_plain:.0f} ms; "
        f"coco_segm_metrics {1000 * t_ours:.0f} ms ({t_ours / t_plain:.2f}x); "
        f"occlusion_breakdown ({len(bins) - 1} bins) {1000 * t_bins:.0f} ms; ours in all "
        f"{1000 * (t_ours + t_bins):.0f} ms ({(t_ours + t_bins) / t_plain:.2f}x pycocotools alone)",
        flush=True,
    )
    print(
        f"  by CPU time: pycocotools {1000 * plain.median_cpu_s:.0f} ms, coco_segm_metrics "
        f"{1000 * ours.median_cpu_s:.0f} ms, occlusion_breakdown {1000 * breakdown.median_cpu_s:.0f} ms",
        flush=True,
    )

    result = {
        "benchmark": "bench_eval",
        "config_overrides": args.overrides,
        "images": len(gt["images"]),
        "people": people,
        "ignore_regions": ignores,
        "results": len(results),
        "perturbation": {
            "seed": args.seed,
            "miss": args.miss,
            "false_positives": args.false_positives,
        },
        "ap": {
            "pycocotools_alone": dict(zip(METRIC_NAMES, plain_ap, strict=True)),
            "coco_segm_metrics": dict(zip(METRIC_NAMES, ours_ap, strict=True)),
            "identical": identical,
            "occlusion_breakdown": breakdown.results[-1],
        },
        "pycocotools_alone": plain.to_dict(),
        "coco_segm_metrics": ours.to_dict(),
        "occlusion_breakdown": {**breakdown.to_dict(), "bins": bins},
        "ratio_coco_segm_metrics_to_pycocotools": t_ours / t_plain,
        "ratio_ours_total_to_pycocotools": (t_ours + t_bins) / t_plain,
        "measured_unix": time.time(),
    }
    for key in ("pycocotools_alone", "coco_segm_metrics", "occlusion_breakdown"):
        result[key].pop("results", None)
    path = common.write_json(args.out, result, machine=machine)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    common.main_guard(main)
