"""What the benchmark scripts share: machine info, timers, JSON output, data and Ray helpers.

Each script puts the repo root on ``sys.path`` and does ``from benchmarks import common``
(``benchmarks/`` is a plain folder of scripts, imported as a namespace package).

Conventions of every script:

- figures are printed as they are measured and written as JSON to ``--out`` (default:
  :func:`default_out_path`, under the system temp dir, so nothing lands in the repo);
- the JSON carries :func:`machine_info` (CPU count, torch threads, versions, git commit) and
  the load average at the start and at the end: a figure measured on a busy machine says so;
- "per core" figures use CPU time (robust to other load on a shared machine), wall-clock
  figures are given beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def limit_threads_env() -> None:
    """One BLAS/OpenMP thread per process unless the caller set otherwise (call before numpy)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def ray_env() -> None:
    """Local-Ray settings of the scripts: no token auth, a private temp dir, Train V2."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray-bench-"))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


# --------------------------------------------------------------------------------------------
# Machine info and output
# --------------------------------------------------------------------------------------------


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux/macOS
        return []


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def machine_info() -> dict[str, Any]:
    """Where the figures were measured: CPUs, torch threads, versions, GPU, git commit, load."""
    import torch

    from pose2seg.precision import cpu_bf16_flags

    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        usable_cpus = os.cpu_count()
    status = _git("status", "--porcelain", "--untracked-files=no")
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "ray": _version("ray"),
        "pyarrow": _version("pyarrow"),
        "pycocotools": _version("pycocotools"),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_native_bf16_flags": list(cpu_bf16_flags()),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_tracked_files": None if status is None else len(status.splitlines()),
        "load_average_1_5_15min": load_average(),
    }
    return info


def default_out_path(name: str) -> str:
    """``<tmp>/pose2seg-benchmarks/<name>.json``: outside the repo, so nothing gets committed."""
    return os.path.join(tempfile.gettempdir(), "pose2seg-benchmarks", f"{name}.json")


def write_json(path: str, result: dict[str, Any], *, machine: dict[str, Any]) -> str:
    """Write ``result`` with the machine info and the load average now; returns the path."""
    doc = {
        **result,
        "machine": machine,
        "load_average_1_5_15min_at_end": load_average(),
        "finished_unix": time.time(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def add_common_args(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out``, ``--config`` and repeatable ``--set KEY=VALUE`` (the workflows' config keys)."""
    parser.add_argument(
        "--out",
        default=default_out_path(name),
        help="JSON file of the figures (default: %(default)s)",
    )
    parser.add_argument("--config", help="experiment YAML (default: the config defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted config key, e.g. --set data.synthetic_num_train=64 (repeatable)",
    )


def config_from_args(args: argparse.Namespace):
    """The validated config; relative data paths resolve against the repo root, as for the
    workflows run from there (``--out`` is made absolute first)."""
    from pose2seg.config import load_config

    args.out = os.path.abspath(args.out)
    if args.config:
        args.config = os.path.abspath(args.config)
    os.chdir(REPO_ROOT)
    return load_config(args.config, args.overrides)


def print_header(title: str, machine: dict[str, Any]) -> None:
    gpu = machine["gpu"] or "no GPU"
    print(
        f"== {title} ==\n"
        f"machine: {machine['usable_cpus']} usable CPUs ({machine['cpu_model']}; native bf16: "
        f"{', '.join(machine.get('cpu_native_bf16_flags') or []) or 'none'}), {gpu}; "
        f"torch {machine['torch']}, ray {machine['ray']}; commit {str(machine['git_commit'])[:12]}; "
        f"load average {machine['load_average_1_5_15min']}",
        flush=True,
    )


# --------------------------------------------------------------------------------------------
# Timers
# --------------------------------------------------------------------------------------------


def _tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc (Linux); just ``root`` elsewhere."""
    parents: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [root]
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: parse after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def tree_cpu_seconds(root: int | None = None) -> float:
    """User + system CPU seconds used so far by a process and all its live descendants.

    With a local Ray instance started by this process, that is the driver, the raylet, the GCS
    and every Ray worker: the CPU cost of a Ray Data pipeline wherever its tasks ran. CPU time
    of descendants that already exited is lost (Ray keeps its workers alive, so little is).
    Falls back to this process's CPU time where /proc is missing.
    """
    root = os.getpid() if root is None else root
    if not os.path.isdir("/proc"):
        return time.process_time()
    total = 0
    for pid in _tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / _TICKS


@dataclass
class Timing:
    """Wall-clock and CPU seconds of one measured call."""

    wall_s: float
    cpu_s: float


@dataclass
class Repeats:
    """Timings of repeated calls; medians are what the scripts report."""

    timings: list[Timing] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)

    @property
    def median_wall_s(self) -> float:
        return statistics.median(t.wall_s for t in self.timings)

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(t.cpu_s for t in self.timings)

    @property
    def min_wall_s(self) -> float:
        return min(t.wall_s for t in self.timings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repeats": len(self.timings),
            "median_wall_s": self.median_wall_s,
            "median_cpu_s": self.median_cpu_s,
            "min_wall_s": self.min_wall_s,
            "wall_s": [round(t.wall_s, 6) for t in self.timings],
            "cpu_s": [round(t.cpu_s, 6) for t in self.timings],
        }


def timed(fn: Callable[[], Any], *, cpu: str = "process", sync: Callable[[], None] | None = None):
    """``(fn(), Timing)``. ``cpu``: ``process`` (this process, all its threads) or ``tree``
    (this process and its descendants: local Ray). ``sync`` runs before each clock read
    (``torch.cuda.synchronize`` when timing GPU work)."""
    clock = tree_cpu_seconds if cpu == "tree" else time.process_time
    if sync is not None:
        sync()
    c0, w0 = clock(), time.perf_counter()
    result = fn()
    if sync is not None:
        sync()
    wall = time.perf_counter() - w0
    return result, Timing(wall_s=wall, cpu_s=clock() - c0)


def repeat(
    fn: Callable[[], Any],
    *,
    repeats: int,
    warmup: int = 0,
    cpu: str = "process",
    sync: Callable[[], None] | None = None,
) -> Repeats:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed."""
    for _ in range(warmup):
        fn()
    out = Repeats()
    for _ in range(repeats):
        result, timing = timed(fn, cpu=cpu, sync=sync)
        out.timings.append(timing)
        out.results.append(result)
    return out


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# Ray and data
# --------------------------------------------------------------------------------------------


def start_ray(num_cpus: int) -> None:
    """A private local Ray instance with ``num_cpus`` CPUs, no dashboard, quiet progress bars."""
    ray_env()
    from workflows.cli import init_ray

    init_ray(
        num_cpus=num_cpus,
        dashboard=False,
        log_to_driver=False,
        progress_bars=False,
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
    )


def ensure_preprocessed(config) -> None:
    """Generate and preprocess the config's dataset variant unless its meta.json exists
    (starts and stops a local Ray only when there is work to do)."""
    from preprocessing.pipeline import META_FILE, preprocess_dataset, variant_dir
    from preprocessing.storage import exists, join

    if exists(join(variant_dir(config), META_FILE)):
        return
    import ray

    print(f"preprocessing the dataset variant {config.preprocess_key()} (once)...", flush=True)
    started = not ray.is_initialized()
    if started:
        start_ray(os.cpu_count() or 1)
    try:
        preprocess_dataset(config)
    finally:
        if started:
            ray.shutdown()


def read_rows(config, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Decoded Parquet rows of a preprocessed split, read with pyarrow (no Ray)."""
    import pyarrow.parquet as pq

    from preprocessing.pipeline import processed_dir
    from preprocessing.schema import decode_row
    from preprocessing.storage import pyarrow_filesystem

    fs, path = pyarrow_filesystem(processed_dir(config, split))
    table = pq.read_table(path, filesystem=fs)
    if limit is not None:
        table = table.slice(0, limit)
    return [decode_row(row) for row in table.to_pylist()]


def load_templates(config):
    """The (T, K, 2) pose templates of the config's preprocessed variant."""
    from preprocessing.pipeline import load_templates as stored_templates

    return stored_templates(config)


# --------------------------------------------------------------------------------------------
# The model's training step rate (shared by bench_train and bench_input_pipeline)
# --------------------------------------------------------------------------------------------


def build_training(config, device: str):
    """A fresh model (train mode) and its optimiser for ``config``, on ``device``."""
    import torch

    from pose2seg.arch import build_model
    from pose2seg.engine import build_optimizer

    torch.manual_seed(config.train.seed)
    model = build_model(config.model, input_size=config.data.input_size).to(device).train()
    return model, build_optimizer(model, config.train)


def measure_train_steps(
    config,
    batches: list,
    *,
    steps: int,
    warmup: int,
    device: str = "cpu",
    autocast_dtype=None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Time ``steps`` calls of :func:`pose2seg.engine.train_step` after ``warmup`` untimed ones.

    ``batches`` (PersonBatch, on any device) are moved to ``device`` first and cycled, so the
    figure is the model's step rate alone, without data loading. Returns images/s and people/s
    by wall clock and by this process's CPU time, and the median step.
    """
    import torch

    from pose2seg.engine import train_step

    model, optimizer = build_training(config, device)
    batches = [b.to(device) for b in batches]
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    counter = {"i": 0}

    def one_step():
        i = counter["i"]
        counter["i"] += 1
        batch = batches[i % len(batches)]
        train_step(
            model,
            batch,
            optimizer,
            scaler=scaler,
            autocast_dtype=autocast_dtype,
            grad_clip_norm=config.train.grad_clip_norm,
            step=i,
        )
        if on_step is not None:
            on_step(i)
        return batch.num_images, batch.num_people

    reps = repeat(one_step, repeats=steps, warmup=warmup, sync=sync)
    images = sum(r[0] for r in reps.results)
    people = sum(r[1] for r in reps.results)
    wall = sum(t.wall_s for t in reps.timings)
    cpu = sum(t.cpu_s for t in reps.timings)
    return {
        "device": device,
        "autocast_dtype": None if autocast_dtype is None else str(autocast_dtype),
        "torch_threads": torch.get_num_threads(),
        "steps": steps,
        "warmup_steps": warmup,
        "batch_size": config.train.batch_size,
        "images": images,
        "people": people,
        "wall_s": wall,
        "cpu_s": cpu,
        "images_per_s_wall": rate(images, wall),
        "people_per_s_wall": rate(people, wall),
        "images_per_s_cpu": rate(images, cpu),
        "people_per_s_cpu": rate(people, cpu),
        "median_step_wall_s": reps.median_wall_s,
        "median_step_cpu_s": reps.median_cpu_s,
    }


def main_guard(fn: Callable[[list[str] | None], int]) -> None:
    """Run a script's ``main`` and exit with its status."""
    sys.exit(fn(sys.argv[1:]))
