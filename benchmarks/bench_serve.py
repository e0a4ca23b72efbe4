"""Benchmark of online inference with Ray Serve (a script, not a test).

Requests/s and per-request latency (p50, p95) of the Serve application of
``workflows/serve_app.py`` over real HTTP on a private local Ray instance, for 1 and 2 replicas
(``--replicas``): a fixed set of val images of the config (default: the synthetic split,
generated if absent), each POSTed as base64 PNG with its ground-truth keypoints, by
``--concurrency`` client threads in this process, ``--requests`` requests per setting after
``--warmup`` untimed ones. The answers' ``batch_size`` field gives the mean batch the replicas
ran (``serve.max_batch_size``, ``serve.batch_wait_timeout_s``).

The model is the config's architecture with RANDOM weights (speed does not depend on the
weights), saved as a checkpoint folder that the replicas load; templates are fitted on the
benchmark's keypoints. The client, the HTTP proxy and the replicas share the machine's cores:
on a small machine the figures are those of the whole loop, not of the model alone.

    python benchmarks/bench_serve.py --out /tmp/bench_serve.json
    python benchmarks/bench_serve.py --replicas 1 2 4 --set serve.cpus_per_replica=1
    python benchmarks/bench_serve.py --device cuda          # GPU replicas, when there is a GPU
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

common.limit_threads_env()


def load_requests(config, max_images: int) -> tuple[list[dict], list, int]:
    """Request bodies (base64 image + keypoints) of the first val images with people."""
    from preprocessing.storage import join, read_bytes
    from workflows.eval_io import gt_keypoints, load_gt, split_paths

    if config.data.source == "synthetic":
        from preprocessing.synthetic import ensure_synthetic_dataset

        ensure_synthetic_dataset(config)
    annotations, images_uri = split_paths(config, "val")
    gt = load_gt(annotations)
    kps = gt_keypoints(gt)
    bodies, keypoints = [], []
    for im in gt["images"]:
        people = kps[int(im["id"])]
        if not len(people):
            continue
        data = read_bytes(join(images_uri, im["file_name"]))
        bodies.append(
            {
                "image": base64.b64encode(data).decode("ascii"),
                "keypoints": people.reshape(-1, 51).tolist(),
                "image_id": int(im["id"]),
            }
        )
        keypoints.append(people)
        if max_images and len(bodies) >= max_images:
            break
    return bodies, keypoints, int(sum(len(k) for k in keypoints))


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")
        return json.loads(resp.read())


def load_test(url: str, bodies: list[dict], *, requests: int, concurrency: int) -> dict:
    """``requests`` POSTs from ``concurrency`` threads; latencies, wall time and batch sizes."""
    latencies: list[float] = []
    batches: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                out = post(url, bodies[i % len(bodies)])
            except Exception as exc:  # counted and reported, the run goes on
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                batches.append(int(out["batch_size"]))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))] if lat else float("nan")

    return {
        "requests": requests,
        "ok": len(latencies),
        "errors": errors[:5],
        "num_errors": len(errors),
        "concurrency": concurrency,
        "wall_s": wall,
        "requests_per_s": common.rate(len(latencies), wall),
        "latency_p50_ms": 1000 * pct(0.50),
        "latency_p95_ms": 1000 * pct(0.95),
        "latency_mean_ms": 1000 * statistics.fmean(lat) if lat else float("nan"),
        "mean_batch_size": statistics.fmean(batches) if batches else float("nan"),
        "max_batch_size_seen": max(batches) if batches else 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, "bench_serve")
    parser.add_argument("--max-images", type=int, default=16, help="distinct val images sent")
    parser.add_argument("--requests", type=int, default=96, help="timed requests per setting")
    parser.add_argument("--warmup", type=int, default=8, help="untimed requests first")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    config = common.config_from_args(args)

    import numpy as np
    import torch

    from pose2seg.arch import build_model
    from pose2seg.checkpoint import save_checkpoint
    from pose2seg.templates import fit_pose_templates

    machine = common.machine_info()
    common.print_header("Ray Serve online inference", machine)
    bodies, keypoints, people = load_requests(config, args.max_images)
    if not bodies:
        raise SystemExit("no val image with people")
    templates = fit_pose_templates(
        np.concatenate(keypoints), num_templates=config.model.num_templates, seed=0
    )
    torch.manual_seed(0)
    model = build_model(config.model, input_size=config.data.input_size).eval()
    overrides = {"serve.port": _free_port(), "serve.app_name": "bench-serve"}
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch.cuda.is_available() is False")
        overrides["serve.use_gpu"] = True
    base = config.with_overrides(overrides)
    from pose2seg.precision import resolve_precision

    replica_precision = resolve_precision(base.serve.mixed_precision, args.device)
    print(f"replica precision: {replica_precision.describe()}", flush=True)
    print(
        f"{len(bodies)} val images, {people} people (mean {people / len(bodies):.1f} per request); "
        f"model {config.model.arch} ResNet-{config.model.backbone_depth} with RANDOM weights, "
        f"input {config.data.input_size} px; {args.concurrency} client threads; "
        f"max_batch_size {base.serve.max_batch_size}, batch_wait_timeout_s "
        f"{base.serve.batch_wait_timeout_s}, {base.serve.cpus_per_replica} CPU per replica",
        flush=True,
    )

    import ray
    from ray import serve

    from workflows.serve import run_serve

    settings = []
    common.start_ray(args.num_cpus)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-serve-ckpt-") as ckpt:
            save_checkpoint(ckpt, model=model, config=config, templates=templates, state={})
            for replicas in args.replicas:
                cfg = base.with_overrides({"serve.num_replicas": replicas})
                t0 = time.perf_counter()
                info = run_serve(cfg, model_ref=ckpt)
                deploy_s = time.perf_counter() - t0
                load_test(info["url"], bodies, requests=args.warmup, concurrency=args.concurrency)
                figures = load_test(
                    info["url"], bodies, requests=args.requests, concurrency=args.concurrency
                )
                figures.update({"replicas": replicas, "deploy_s": deploy_s})
                settings.append(figures)
                print(
                    f"{replicas} replica(s): {figures['requests_per_s']:.1f} requests/s "
                    f"({figures['requests_per_s'] * people / len(bodies):.1f} people/s), latency "
                    f"p50 {figures['latency_p50_ms']:.0f} ms, p95 {figures['latency_p95_ms']:.0f} ms; "
                    f"mean batch {figures['mean_batch_size']:.2f}; {figures['num_errors']} errors; "
                    f"deployed in {deploy_s:.1f} s",
                    flush=True,
                )
                serve.delete(cfg.serve.app_name)
    finally:
        serve.shutdown()
        ray.shutdown()

    result = {
        "benchmark": "bench_serve",
        "config_overrides": args.overrides,
        "random_weights": True,
        "images": len(bodies),
        "people": people,
        "device": args.device,
        "replica_precision": replica_precision.describe(),
        "serve": {
            "cpus_per_replica": base.serve.cpus_per_replica,
            "max_batch_size": base.serve.max_batch_size,
            "batch_wait_timeout_s": base.serve.batch_wait_timeout_s,
            "use_gpu": base.serve.use_gpu,
        },
        "settings": settings,
        "measured_unix": time.time(),
    }
    path = common.write_json(args.out, result, machine=machine)
    print(f"wrote {path}")
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    common.main_guard(main)
