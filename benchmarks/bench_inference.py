"""Benchmark of inference throughput (a script, not a test).

Images/s and people/s of segmenting the people of images given their keypoints, on the config's
val split (default: the synthetic one, generated if absent; ground-truth keypoints):

1. in-process: ``pose2seg.inference.Predictor.predict`` one image at a time (what each Ray Data
   actor does per image), on images decoded beforehand, ``--threads`` torch threads (default 1,
   what an inference actor uses on CPU); also ``Predictor.predict_batch`` with
   ``eval.batch_size`` images per call;
2. the Ray Data path of ``predict.py`` and ``evaluate.py``: ``workflows.batch_inference.
   run_batch_inference`` on a local Ray instance, reading the image files, with a checkpoint
   written by ``pose2seg.checkpoint.save_checkpoint``. Its figure is end to end: actor start-up
   and model loading are inside it, as they are for a predict.py run.

The model is the config's architecture with RANDOM weights (speed does not depend on the
weights; the masks are meaningless). Templates are fitted on the benchmark's own keypoints.

    python benchmarks/bench_inference.py --out /tmp/bench_inference.json
    python benchmarks/bench_inference.py --device cuda        # also on the GPU, when there is one
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

common.limit_threads_env()


def load_items(config, max_images: int) -> list:
    """InferenceItems of the val split: image URI and the (N,17,3) keypoints of its people."""
    import numpy as np

    from preprocessing.pipeline import raw_paths
    from preprocessing.storage import join, read_bytes
    from workflows.batch_inference import InferenceItem

    if config.data.source == "synthetic":
        from preprocessing.synthetic import ensure_synthetic_dataset

        ensure_synthetic_dataset(config)
    annotations_uri, images_uri = raw_paths(config, "val")
    gt = json.loads(read_bytes(annotations_uri))
    people: dict[int, list] = {int(im["id"]): [] for im in gt["images"]}
    for ann in gt["annotations"]:
        kp = ann.get("keypoints")
        if ann.get("iscrowd", 0) or not kp or len(kp) != 51:
            continue
        arr = np.asarray(kp, np.float32).reshape(17, 3)
        if (arr[:, 2] > 0).any() and int(ann["image_id"]) in people:
            people[int(ann["image_id"])].append(arr)
    items = []
    for im in gt["images"]:
        kps = people[int(im["id"])]
        if not kps:
            continue
        items.append(
            InferenceItem(
                image_id=int(im["id"]),
                uri=join(images_uri, im["file_name"]),
                keypoints=np.stack(kps),
            )
        )
    return items[:max_images] if max_images else items


def bench_in_process(model, templates, config, images, items, *, device, repeats, warmup):
    from pose2seg.inference import Predictor

    predictor = Predictor(
        model,
        templates,
        config.model,
        device=device,
        input_size=config.data.input_size,
        precision=config.eval.mixed_precision,
    )
    print(f"{device}: precision {predictor.precision.describe()}", flush=True)
    sync = None
    if device == "cuda":
        import torch

        sync = torch.cuda.synchronize
    people = sum(len(it.keypoints) for it in items)

    def one_by_one():
        return sum(
            len(predictor.predict(img, it.keypoints, image_id=it.image_id))
            for img, it in zip(images, items, strict=True)
        )

    bs = config.eval.batch_size

    def batched():
        count = 0
        for i in range(0, len(items), bs):
            chunk = items[i : i + bs]
            count += len(
                predictor.predict_batch(
                    images[i : i + bs],
                    [it.keypoints for it in chunk],
                    image_ids=[it.image_id for it in chunk],
                )
            )
        return count

    out = {"precision": predictor.precision.describe()}
    for name, fn in (("predict", one_by_one), (f"predict_batch_{bs}", batched)):
        reps = common.repeat(fn, repeats=repeats, warmup=warmup, sync=sync)
        out[name] = {
            **reps.to_dict(),
            "results": reps.results[-1],
            "images_per_s_wall": common.rate(len(items), reps.median_wall_s),
            "people_per_s_wall": common.rate(people, reps.median_wall_s),
            "images_per_s_cpu": common.rate(len(items), reps.median_cpu_s),
            "people_per_s_cpu": common.rate(people, reps.median_cpu_s),
        }
    return out


def bench_ray(items, config, checkpoint_dir, *, actors, use_gpu, repeats):
    from workflows.batch_inference import run_batch_inference

    runs = []
    for _ in range(repeats):
        results, stats = run_batch_inference(
            items, model_ref=checkpoint_dir, config=config, num_actors=actors, use_gpu=use_gpu
        )
        runs.append({**stats, "results": len(results)})
    best = min(runs, key=lambda r: r["seconds"])
    return {"runs": runs, "actors": actors, "use_gpu": use_gpu, "fastest": best}


def _print_in_process(label: str, figures: dict) -> None:
    precision = figures["precision"]
    for name, f in figures.items():
        if name == "precision":
            continue
        print(
            f"{label} {name} [{precision}]: {f['images_per_s_wall']:.1f} images/s, {f['people_per_s_wall']:.1f} "
            f"people/s (wall; by CPU time {f['images_per_s_cpu']:.1f} images/s, "
            f"{f['people_per_s_cpu']:.1f} people/s)",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, "bench_inference")
    parser.add_argument("--max-images", type=int, default=0, help="first N val images (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in-process")
    parser.add_argument("--repeats", type=int, default=3, help="timed in-process passes")
    parser.add_argument("--warmup", type=int, default=1, help="untimed in-process passes first")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--actors", type=int, default=1, help="Ray Data predictor actors")
    parser.add_argument("--ray-repeats", type=int, default=2, help="run_batch_inference calls")
    parser.add_argument("--skip-ray", action="store_true", help="only the in-process part")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: also run both parts on the GPU (skipped without one)",
    )
    args = parser.parse_args(argv)
    config = common.config_from_args(args)

    import numpy as np
    import torch

    from pose2seg.arch import build_model
    from pose2seg.checkpoint import save_checkpoint
    from pose2seg.templates import fit_pose_templates
    from preprocessing.schema import decode_image
    from preprocessing.storage import read_bytes

    torch.set_num_threads(args.threads)
    machine = common.machine_info()
    common.print_header("inference throughput", machine)
    items = load_items(config, args.max_images)
    if not items:
        raise SystemExit("no val image with people")
    images = [decode_image(read_bytes(it.uri)) for it in items]
    people = sum(len(it.keypoints) for it in items)
    templates = fit_pose_templates(
        np.concatenate([it.keypoints for it in items]),
        num_templates=config.model.num_templates,
        seed=0,
    )
    torch.manual_seed(0)
    model = build_model(config.model, input_size=config.data.input_size).eval()
    sizes = sorted({im.shape[:2] for im in images})
    print(
        f"{len(items)} val images ({sizes[0][0]}x{sizes[0][1]}"
        f"{'' if len(sizes) == 1 else ' and other sizes'}), {people} people; model "
        f"{config.model.arch} ResNet-{config.model.backbone_depth} with RANDOM weights, input "
        f"{config.data.input_size} px, S={config.model.roi_size}",
        flush=True,
    )

    cpu = bench_in_process(
        model,
        templates,
        config,
        images,
        items,
        device="cpu",
        repeats=args.repeats,
        warmup=args.warmup,
    )
    _print_in_process(f"in-process CPU ({args.threads} thread(s))", cpu)

    want_gpu = args.device == "cuda"
    gpu_ok = want_gpu and torch.cuda.is_available()
    gpu: dict = {}
    if gpu_ok:
        gpu = bench_in_process(
            model,
            templates,
            config,
            images,
            items,
            device="cuda",
            repeats=args.repeats,
            warmup=args.warmup,
        )
        _print_in_process(f"in-process GPU ({torch.cuda.get_device_name(0)})", gpu)
        model = model.cpu()
    elif want_gpu:
        gpu = {"skipped": "--device cuda given but torch.cuda.is_available() is False"}
        print(f"GPU part skipped: {gpu['skipped']}", flush=True)

    ray_figures: dict = {"skipped": "--skip-ray"}
    if not args.skip_ray:
        import ray

        common.start_ray(args.num_cpus)
        try:
            with tempfile.TemporaryDirectory(prefix="bench-inference-ckpt-") as ckpt:
                save_checkpoint(ckpt, model=model, config=config, templates=templates, state={})
                ray_figures = {
                    "cpu": bench_ray(
                        items,
                        config,
                        ckpt,
                        actors=args.actors,
                        use_gpu=False,
                        repeats=args.ray_repeats,
                    )
                }
                if gpu_ok:
                    ray_figures["gpu"] = bench_ray(
                        items, config, ckpt, actors=1, use_gpu=True, repeats=args.ray_repeats
                    )
        finally:
            ray.shutdown()
        for kind, figures in ray_figures.items():
            runs = ", ".join(
                f"{r['images_per_s']:.1f} images/s ({r['seconds']:.1f} s)" for r in figures["runs"]
            )
            best = figures["fastest"]
            print(
                f"Ray Data run_batch_inference ({kind}, {figures['actors']} actor(s), Ray "
                f"{args.num_cpus} CPUs, end to end incl. actor start-up): fastest "
                f"{best['images_per_s']:.1f} images/s, {best['people_per_s']:.1f} people/s "
                f"[runs: {runs}]",
                flush=True,
            )

    result = {
        "benchmark": "bench_inference",
        "config_overrides": args.overrides,
        "random_weights": True,
        "images": len(items),
        "people": people,
        "threads": args.threads,
        "in_process_cpu": cpu,
        "in_process_gpu": gpu or {"skipped": "not requested (--device cpu)"},
        "ray_batch_inference": ray_figures,
        "measured_unix": time.time(),
    }
    path = common.write_json(args.out, result, machine=machine)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    common.main_guard(main)
