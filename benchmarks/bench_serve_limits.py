"""Benchmark of one oversized Serve request, without and with ``serve.max_image_pixels``
(a script, not a test).

A PNG of ``--side`` x ``--side`` pixels (default 13000, i.e. 169 million pixels: under
Pillow's own decompression-bomb error limit, a few hundred KB on the wire) is POSTed with one
person's keypoints to the Serve application of ``workflows/serve_app.py`` on a private local
Ray instance, twice, each time to a freshly deployed replica:

- ``unbounded``: ``serve.max_image_pixels=0`` (the behaviour before the key existed): the
  replica decodes the whole image and runs the model on it;
- ``bounded``: the config's ``serve.max_image_pixels`` (default 50 million): the replica reads
  the PNG header, answers 413 and decodes nothing.

Figures per setting: the HTTP status, the request's latency, and the replica process's peak
resident memory (Linux ``VmHWM`` of the ``ServeReplica`` process, read after one small warm-up
request and after the big one), so the difference is what the big request cost. The model is
the config's architecture with RANDOM weights. On a shared or small machine the latency is that
of the whole loop (client, proxy, replica share the cores).

    python benchmarks/bench_serve_limits.py --out /tmp/bench_serve_limits.json
    python benchmarks/bench_serve_limits.py --side 3000 --set serve.max_image_pixels=4000000
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

common.limit_threads_env()


def big_png(side: int) -> bytes:
    """A ``side`` x ``side`` RGB PNG: grey with a few stripes (compresses to little)."""
    import numpy as np
    from PIL import Image

    pixels = np.full((side, side, 3), 120, np.uint8)
    pixels[:: max(1, side // 64)] = 30
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def small_png(side: int = 64) -> bytes:
    return big_png(side)


def one_person(side: int) -> list[float]:
    """A person in the middle of a ``side`` px image, all 17 keypoints labelled."""
    import numpy as np

    rng = np.random.default_rng(0)
    xy = side / 2 + rng.uniform(-0.1, 0.1, size=(17, 2)) * side
    return np.concatenate([xy, np.full((17, 1), 2.0)], axis=1).reshape(-1).tolist()


def post(url: str, body: dict) -> tuple[int, dict, float]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            status, answer = resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        status, answer = err.code, json.loads(err.read())
    return status, answer, time.perf_counter() - t0


def replica_pids(app_name: str) -> list[int]:
    """PIDs of this application's Serve replica processes (Ray titles them
    ``ray::ServeReplica:<app>:<deployment>``)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().decode(errors="replace")
        except OSError:
            continue
        if f"ServeReplica:{app_name}:" in cmdline:
            pids.append(int(entry))
    return pids


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, "bench_serve_limits")
    parser.add_argument("--side", type=int, default=13000, help="the big PNG's side in pixels")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    args = parser.parse_args(argv)
    config = common.config_from_args(args)

    import numpy as np
    import torch

    from pose2seg.arch import build_model
    from pose2seg.checkpoint import save_checkpoint

    machine = common.machine_info()
    common.print_header("Ray Serve: one oversized image, unbounded vs bounded", machine)
    data = big_png(args.side)
    big = {"image": base64.b64encode(data).decode("ascii"), "keypoints": [one_person(args.side)]}
    warm = {
        "image": base64.b64encode(small_png()).decode("ascii"),
        "keypoints": [one_person(64)],
    }
    print(
        f"request: {args.side}x{args.side} PNG, {len(data) / 1e3:.0f} KB "
        f"({args.side * args.side / 1e6:.0f} Mpixels), one person; model {config.model.arch} "
        f"ResNet-{config.model.backbone_depth} with RANDOM weights",
        flush=True,
    )
    torch.manual_seed(0)
    model = build_model(config.model, input_size=config.data.input_size).eval()
    templates = np.tile(
        np.asarray(one_person(2), np.float32).reshape(17, 3)[None, :, :2] - 1.0,
        (config.model.num_templates, 1, 1),
    )

    import ray
    from ray import serve

    from workflows.serve import run_serve

    settings = []
    port = _free_port()  # one proxy for both settings: Serve keeps its first HTTP options
    common.start_ray(args.num_cpus)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-serve-limits-") as ckpt:
            save_checkpoint(ckpt, model=model, config=config, templates=templates, state={})
            for name, limit in (("unbounded", 0), ("bounded", config.serve.max_image_pixels)):
                app = f"bench-limits-{name}"
                cfg = config.with_overrides(
                    {
                        "serve.port": port,
                        "serve.app_name": app,
                        "serve.max_image_pixels": limit,
                    }
                )
                info = run_serve(cfg, model_ref=ckpt)
                status, _, _ = post(info["url"], warm)
                (pid,) = replica_pids(app)
                before_mb = peak_rss_mb(pid)
                status, answer, seconds = post(info["url"], big)
                after_mb = peak_rss_mb(pid)
                alive, _, _ = post(info["url"], warm)
                figures = {
                    "setting": name,
                    "max_image_pixels": limit,
                    "status": status,
                    "latency_s": seconds,
                    "replica_peak_rss_mb_before": before_mb,
                    "replica_peak_rss_mb_after": after_mb,
                    "replica_answers_after": alive,
                    "error": answer.get("error"),
                }
                settings.append(figures)
                print(
                    f"{name} (serve.max_image_pixels={limit}): HTTP {status} in {seconds:.2f} s; "
                    f"replica peak RSS {before_mb:.0f} MB -> {after_mb:.0f} MB; next request "
                    f"HTTP {alive}" + (f"; error: {answer['error']}" if "error" in answer else ""),
                    flush=True,
                )
                serve.delete(app)
    finally:
        serve.shutdown()
        ray.shutdown()

    result = {
        "benchmark": "bench_serve_limits",
        "config_overrides": args.overrides,
        "random_weights": True,
        "side_px": args.side,
        "png_bytes": len(data),
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
