"""Benchmark of training throughput (a script, not a test).

Times ``pose2seg.engine.train_step`` (forward, loss, backward, clipping, AdamW step) of the
config's model (default: Pose2Seg, ResNet-18 FPN, S = 48, 160 px inputs, batch 8) in-process, on
real batches of the preprocessed training split (collated once beforehand, so data loading is
not counted; ``bench_input_pipeline.py`` measures that side):

1. CPU, ``--threads`` torch threads (default 1: what one Ray Train worker with
   ``train.cpus_per_worker`` <= 1 uses): images/s and people/s per worker, by wall clock and by
   CPU time (the per-core figure, robust to other load on the machine);
2. with ``--device cuda`` and a GPU: fp32 and mixed precision (bf16 autocast, fp16 + GradScaler
   where bf16 is unsupported), with the GPU utilisation sampled during the steps
   (``torch.cuda.utilization()``, else ``nvidia-smi``). Without a GPU this part is skipped and
   the JSON says so.

    python benchmarks/bench_train.py --out /tmp/bench_train.json
    python benchmarks/bench_train.py --device cuda --gpu-steps 200      # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

common.limit_threads_env()


def make_batches(config, num_batches: int, batch_size: int) -> list:
    """``num_batches`` collated batches from the start of the training split."""
    from pose2seg.batch import collate

    rows = common.read_rows(config, "train", limit=num_batches * batch_size)
    if not rows:
        raise SystemExit("the training split is empty")
    return [
        collate(rows[i : i + batch_size], input_size=config.data.input_size)
        for i in range(0, len(rows), batch_size)
    ]


class GpuSampler:
    """Samples the GPU utilisation (%) every ``period`` seconds in a background thread."""

    def __init__(self, period: float = 0.2) -> None:
        self.period = period
        self.samples: list[float] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> float | None:
        import torch

        if self.source != "nvidia-smi":
            try:
                value = float(torch.cuda.utilization())
                self.source = "torch.cuda.utilization"
                return value
            except Exception:  # pynvml missing or NVML unavailable: fall back to nvidia-smi
                self.source = "nvidia-smi"
        smi = shutil.which("nvidia-smi")
        if smi is None:
            self.source = None
            self._stop.set()
            return None
        try:
            out = subprocess.run(
                [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            )
            return float(out.stdout.strip().splitlines()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            value = self._read()
            if value is not None:
                self.samples.append(value)
            self._stop.wait(self.period)

    def __enter__(self) -> GpuSampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def summary(self) -> dict:
        if not self.samples:
            return {"source": None, "samples": 0, "mean_percent": None, "max_percent": None}
        return {
            "source": self.source,
            "samples": len(self.samples),
            "mean_percent": sum(self.samples) / len(self.samples),
            "max_percent": max(self.samples),
        }


def bench_gpu(config, batches: list, *, steps: int, warmup: int) -> dict:
    import torch

    out: dict = {"device_name": torch.cuda.get_device_name(0)}
    bf16 = torch.cuda.is_bf16_supported()
    for label, dtype in (("fp32", None), ("mixed", torch.bfloat16 if bf16 else torch.float16)):
        torch.cuda.reset_peak_memory_stats()
        with GpuSampler() as sampler:
            figures = common.measure_train_steps(
                config, batches, steps=steps, warmup=warmup, device="cuda", autocast_dtype=dtype
            )
        figures["gpu_utilisation"] = sampler.summary()
        figures["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out[label] = figures
        util = figures["gpu_utilisation"]["mean_percent"]
        print(
            f"GPU {label:5s} ({figures['autocast_dtype'] or 'float32'}): "
            f"{figures['images_per_s_wall']:.1f} images/s, {figures['people_per_s_wall']:.1f} "
            f"people/s, median step {1000 * figures['median_step_wall_s']:.1f} ms, GPU "
            f"utilisation {'n/a' if util is None else f'{util:.0f}%'} "
            f"({figures['gpu_utilisation']['source']}), peak memory "
            f"{figures['peak_memory_mib']:.0f} MiB",
            flush=True,
        )
    out["mixed_speedup"] = out["mixed"]["images_per_s_wall"] / out["fp32"]["images_per_s_wall"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, "bench_train")
    parser.add_argument("--steps", type=int, default=20, help="timed CPU steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="images per step (default train.batch_size)"
    )
    parser.add_argument(
        "--num-batches", type=int, default=4, help="distinct batches cycled through"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: also time fp32 and mixed precision on the GPU (skipped without one)",
    )
    parser.add_argument("--gpu-steps", type=int, default=100, help="timed steps per GPU mode")
    parser.add_argument("--gpu-warmup", type=int, default=10)
    args = parser.parse_args(argv)
    config = common.config_from_args(args)
    if args.batch_size:
        config.train.batch_size = args.batch_size

    import torch

    torch.set_num_threads(args.threads)
    machine = common.machine_info()
    common.print_header("training throughput (pose2seg.engine.train_step)", machine)
    common.ensure_preprocessed(config)
    batches = make_batches(config, args.num_batches, config.train.batch_size)
    people_per_image = sum(b.num_people for b in batches) / sum(b.num_images for b in batches)
    model_desc = (
        f"{config.model.arch} ResNet-{config.model.backbone_depth}, FPN "
        f"{config.model.fpn_channels}, S={config.model.roi_size}, input {config.data.input_size} px"
    )
    print(
        f"model: {model_desc}; batch {config.train.batch_size} images "
        f"({people_per_image:.2f} people/image in the {len(batches)} batches cycled)",
        flush=True,
    )

    cpu = common.measure_train_steps(config, batches, steps=args.steps, warmup=args.warmup)
    print(
        f"CPU, {args.threads} thread(s), {args.steps} steps after {args.warmup} warm-up: "
        f"{cpu['images_per_s_cpu']:.2f} images/s and {cpu['people_per_s_cpu']:.2f} people/s "
        f"per worker by CPU time (wall: {cpu['images_per_s_wall']:.2f} images/s, "
        f"{cpu['people_per_s_wall']:.2f} people/s); median step {cpu['median_step_wall_s']:.3f} s "
        f"wall, {cpu['median_step_cpu_s']:.3f} s CPU",
        flush=True,
    )

    gpu: dict
    if args.device == "cuda":
        if torch.cuda.is_available():
            gpu = bench_gpu(config, batches, steps=args.gpu_steps, warmup=args.gpu_warmup)
            print(f"mixed precision speed-up: {gpu['mixed_speedup']:.2f}x", flush=True)
        else:
            gpu = {"skipped": "--device cuda given but torch.cuda.is_available() is False"}
            print(f"GPU part skipped: {gpu['skipped']}", flush=True)
    else:
        gpu = {"skipped": "not requested (--device cpu)"}
        print("GPU part not requested (use --device cuda on a GPU machine)", flush=True)

    result = {
        "benchmark": "bench_train",
        "model": model_desc,
        "config_overrides": args.overrides,
        "preprocess_key": config.preprocess_key(),
        "batch_size": config.train.batch_size,
        "people_per_image": people_per_image,
        "cpu": cpu,
        "gpu": gpu,
        "measured_unix": time.time(),
    }
    path = common.write_json(args.out, result, machine=machine)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    common.main_guard(main)
