"""Benchmark of the preprocessing (a script, not a test).

Measures, on generated synthetic data:

1. people/s on one core for template assignment + skeleton rendering (+ int8 quantisation) at
   S = 64: the pure functions, single process, people grouped per image as the pipeline does;
2. the Ray Data speed-up of the whole pipeline from a 1-CPU to a 2-CPU local Ray instance on
   the same images (wall time of the Ray Data part, workers warmed up by a first run);
3. Parquet bytes per person (skeleton + targets columns, and all columns).

    python benchmarks/bench_preprocess.py --out bench_preprocess.json

Targets (issue 3): >= 500 people/s per core at S = 64 and a speed-up >= 1.7 on 2 CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

# One thread per process: "per core" figures must not borrow other cores.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from pose2seg.config import Config  # noqa: E402
from pose2seg.templates import apply_affine, assign_templates, fit_pose_templates  # noqa: E402
from preprocessing.features import (  # noqa: E402
    quantise,
    render_quantised_skeleton_features,
    render_skeleton_features,
)


def _people_per_image(
    annotations_path: str, input_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(keypoints (N,K,3), boxes (N,4))]`` per image, in the input frame."""
    with open(annotations_path) as fh:
        data = json.load(fh)
    sizes = {im["id"]: max(im["height"], im["width"]) for im in data["images"]}
    per_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0) and ann.get("num_keypoints", 0) > 0:
            per_image.setdefault(ann["image_id"], []).append(ann)
    out = []
    for image_id, anns in sorted(per_image.items()):
        scale = input_size / sizes[image_id]
        kp = np.array([a["keypoints"] for a in anns], dtype=np.float32).reshape(-1, 17, 3)
        kp[..., :2] *= scale
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64) * scale
        out.append((kp, boxes))
    return out


def bench_pure(config: Config, annotations_path: str, *, repeats: int) -> dict[str, float]:
    images = _people_per_image(annotations_path, config.data.input_size)
    templates = fit_pose_templates(
        np.concatenate([k for k, _ in images]), num_templates=config.model.num_templates, seed=0
    )
    people = sum(len(k) for k, _ in images)
    size = config.model.roi_size

    def render_dense(kp: np.ndarray) -> np.ndarray:
        return quantise(render_skeleton_features(kp, roi_size=size, sigma_px=sigma, width_px=width))

    def render_sparse(kp: np.ndarray) -> np.ndarray:
        return render_quantised_skeleton_features(kp, roi_size=size, sigma_px=sigma, width_px=width)

    def run(render) -> dict[str, float]:
        # CPU time of this process (robust to other load on a shared machine) and wall time.
        best_cpu = best_wall = float("inf")
        for _ in range(repeats):
            cpu, wall = time.process_time(), time.perf_counter()
            for kp, boxes in images:
                result = assign_templates(
                    kp, templates, roi_size=size, alignment="pose", boxes=boxes
                )
                if render is not None:
                    render(apply_affine(kp, result.affines))
            best_cpu = min(best_cpu, time.process_time() - cpu)
            best_wall = min(best_wall, time.perf_counter() - wall)
        return {"cpu": people / best_cpu, "wall": people / best_wall}

    sigma, width = config.model.heatmap_sigma_px, config.model.paf_width_px
    sparse = run(render_sparse)
    dense = run(render_dense)
    assign_only = run(None)
    return {
        "people": people,
        "images": len(images),
        "roi_size": size,
        "people_per_s_per_core": sparse["cpu"],
        "people_per_s_wall": sparse["wall"],
        "dense_render_people_per_s_per_core": dense["cpu"],
        "assign_only_people_per_s_per_core": assign_only["cpu"],
    }


def bench_ray(config: Config, *, num_cpus: int) -> dict[str, float]:
    import ray

    from preprocessing.pipeline import preprocess_dataset
    from workflows.cli import init_ray

    init_ray(num_cpus=num_cpus, dashboard=False, log_to_driver=False, progress_bars=False)
    try:
        preprocess_dataset(config, splits=("train",), force=True)  # warm-up: workers, imports
        start = time.perf_counter()
        summary = preprocess_dataset(config, splits=("train",), force=True)
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    split = summary.splits["train"]
    return {
        "num_cpus": num_cpus,
        "seconds": seconds,
        # The split's own stage: shard tasks (read, assign, render, encode, write) plus the
        # driver's listing and read-back; excludes template fitting.
        "split_seconds": split.seconds,
        "images": split.images_in,
        "people": split.people_out,
        "images_per_s": split.images_in / seconds,
        "bytes_per_person": summary.bytes_per_person,
    }


def _parquet_bytes(root: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        total += sum(
            os.path.getsize(os.path.join(dirpath, f)) for f in files if f.endswith(".parquet")
        )
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--workdir", help="data folder (default: a temp dir)")
    parser.add_argument(
        "--images", type=int, default=1440, help="synthetic train images (default: train.py's)"
    )
    parser.add_argument(
        "--images-per-shard",
        type=int,
        default=120,
        help="data.images_per_shard: images per Ray Data task (default 120: ~1.5 s tasks)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-preprocess-")
    config = Config.from_flat(
        {
            "data.root": os.path.join(workdir, "raw"),
            "data.processed": os.path.join(workdir, "processed"),
            "data.synthetic_num_train": args.images,
            "data.synthetic_num_val": 8,
            "data.images_per_shard": args.images_per_shard,
            "model.roi_size": 64,
        }
    )
    from preprocessing.pipeline import processed_dir, raw_paths
    from preprocessing.synthetic import ensure_synthetic_dataset

    ensure_synthetic_dataset(config)
    annotations, _ = raw_paths(config, "train")

    pure = bench_pure(config, annotations, repeats=args.repeats)
    print(
        f"pure functions, 1 process, S={pure['roi_size']}: {pure['people_per_s_per_core']:.0f} "
        f"people/s per core for assignment + rendering + quantisation "
        f"(CPU time; wall {pure['people_per_s_wall']:.0f}; dense rendering "
        f"{pure['dense_render_people_per_s_per_core']:.0f}; assignment alone "
        f"{pure['assign_only_people_per_s_per_core']:.0f}; {pure['people']} people)",
        flush=True,
    )
    one = bench_ray(config, num_cpus=1)
    two = bench_ray(config, num_cpus=2)
    speedup = one["seconds"] / two["seconds"]
    split_speedup = one["split_seconds"] / two["split_seconds"]
    print(
        f"Ray Data pipeline on {one['images']} images / {one['people']} people "
        f"({args.images_per_shard} per shard): 1 CPU {one['seconds']:.2f} s, 2 CPUs "
        f"{two['seconds']:.2f} s -> speed-up {speedup:.2f} (the split stage alone, without "
        f"template fitting: {one['split_seconds']:.2f} s -> {two['split_seconds']:.2f} s, "
        f"{split_speedup:.2f})",
        flush=True,
    )
    train_dir = processed_dir(config, "train")
    all_bytes = _parquet_bytes(train_dir) / max(two["people"], 1)
    bpp = two["bytes_per_person"]
    print(
        f"Parquet bytes per person: skeleton {bpp['skeleton']:.0f} + targets {bpp['targets']:.0f} "
        f"= {bpp['total']:.0f} (raw {bpp['raw']:.0f}); all columns incl. images {all_bytes:.0f}",
        flush=True,
    )
    result = {
        "pure": pure,
        "ray_1cpu": one,
        "ray_2cpu": two,
        "speedup_1_to_2_cpus": speedup,
        "split_stage_speedup_1_to_2_cpus": split_speedup,
        "images_per_shard": args.images_per_shard,
        "parquet_bytes_per_person": {**bpp, "all_columns": all_bytes},
        "targets": {"people_per_s_per_core": 500, "speedup": 1.7},
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15min_at_end": list(os.getloadavg()),
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
