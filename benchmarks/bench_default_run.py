"""The default run as a user runs it, measured: wall and CPU time per phase, Ray worker
processes started, peak memory of the whole process tree.

Runs ``python workflows/train.py`` (plus any ``--set``) as a child process in a fresh working
folder (its own data, runs, MLflow store and Ray temp folder, so a run starts from nothing, as
on a fresh clone), reads its console as it prints and samples ``/proc`` every
``--sample-s`` seconds:

- phases, cut at console lines: ``startup`` (to Ray started), ``generate`` (synthetic data and
  template fitting: to the first ``preprocess[...]`` line), ``preprocess`` (to the MLflow run
  line: Parquet written and opened), per epoch ``train`` and ``validation`` (the loop's
  ``validating`` and epoch lines), ``log_and_register`` (last epoch to the summary) and
  ``shutdown`` (to exit);
- CPU time of the tree (the command, the raylet, GCS, every Ray worker; a process that exited
  is counted through its parent's ``cutime``/``cstime`` once reaped);
- peak resident memory summed over the tree;
- Ray worker processes started: ``python-core-worker-*.log`` files in the Ray session logs,
  by the task or actor each ran (from the ``worker-*.out`` files);
- console lines that are Ray worker-pool warnings.

python benchmarks/bench_default_run.py                      # the default run, as shipped
python benchmarks/bench_default_run.py --set train.epochs=2 --set data.synthetic_num_train=96 \\
    --set data.synthetic_num_val=24                         # a short check
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

WARNING_RE = re.compile(r"PYTHON worker processes have been started")
# Ray's own line (--debug) or the project's ("[pose2seg] started a local Ray instance ...").
RAY_STARTED_RE = re.compile(r"[Ss]tarted a local Ray instance|[Cc]onnected to (the )?Ray cluster")
EPOCH_RE = re.compile(r"\[pose2seg\] epoch (\d+)/(\d+)  loss")
PRECISION_RE = re.compile(r"\[pose2seg\] training precision: (.*)$")
VALIDATING_RE = re.compile(r"\[pose2seg\] epoch (\d+)/(\d+)  trained .*validating")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _pss_bytes(pid: int) -> int | None:
    """Proportional set size (shared pages split between their users), or None."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def tree_usage(root: int) -> tuple[float, int, int, int]:
    """(CPU seconds incl. reaped children, resident bytes, proportional bytes, processes) of
    ``root``'s tree. Resident bytes count shared pages (Ray's object store, mapped by every
    worker) once per process; proportional bytes (PSS) split them, so they sum correctly."""
    cpu, rss, pss, n = 0, 0, 0, 0
    for pid in common._tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        f = stat[stat.rfind(")") + 2 :].split()
        # utime, stime, cutime, cstime; rss in pages.
        cpu += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        rss += int(f[21]) * _PAGE
        p = _pss_bytes(pid)
        pss += p if p is not None else int(f[21]) * _PAGE
        n += 1
    return cpu / _TICKS, rss, pss, n


class Sampler(threading.Thread):
    """Samples the tree every ``period`` seconds; keeps the peak RSS and the last CPU total."""

    def __init__(self, root: int, period: float):
        super().__init__(daemon=True)
        self.root, self.period = root, period
        self.peak_rss, self.peak_pss, self.peak_procs, self.cpu = 0, 0, 0, 0.0
        self.stop = threading.Event()

    def sample(self) -> float:
        cpu, rss, pss, n = tree_usage(self.root)
        # CPU of a tree only grows; a dying process can make one sample dip.
        self.cpu = max(self.cpu, cpu)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, n)
        return self.cpu

    def run(self) -> None:
        while not self.stop.wait(self.period):
            self.sample()


def worker_census(ray_tmp: str) -> dict[str, Any]:
    """Ray worker processes started in the session(s) under ``ray_tmp``, and what each ran."""

    def files(pattern: str) -> set[str]:
        # realpath: ``session_latest`` is a link to the session folder, seen twice by glob.
        found = glob.glob(os.path.join(ray_tmp, "**", "logs", pattern), recursive=True)
        return {os.path.realpath(p) for p in found}

    logs = files("python-core-worker-*.log")
    kinds: Counter[str] = Counter()
    for out in sorted(files("worker-*.out")):
        names: set[str] = set()
        try:
            with open(out, errors="replace") as fh:
                for line in fh:
                    if line.startswith((":task_name:", ":actor_name:")):
                        names.add(line.strip().split(":", 2)[2])
        except OSError:
            continue
        kinds[" + ".join(sorted(names)) or "(ran nothing)"] += 1
    return {"python_worker_processes": len(logs), "by_task_or_actor": dict(kinds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=common.default_out_path("bench_default_run"), help="JSON output"
    )
    parser.add_argument("--config", help="experiment YAML passed to train.py")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--workdir", help="working folder (default: a new temp folder, removed unless --keep)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--sample-s", type=float, default=0.5, help="/proc sampling period")
    parser.add_argument("--label", default="", help="free text stored with the figures")
    args = parser.parse_args(argv)
    args.out = os.path.abspath(args.out)

    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="p2s-default-run-"))
    ray_tmp = os.path.join(workdir, "ray")
    os.makedirs(ray_tmp, exist_ok=True)
    sets = [
        f"data.root={workdir}/data/synthetic",
        f"data.processed={workdir}/data/processed",
        f"train.storage_path={workdir}/runs",
        f"registry.tracking_uri=sqlite:///{workdir}/mlflow.db",
        *args.overrides,
    ]
    cmd = [sys.executable, os.path.join(common.REPO_ROOT, "workflows", "train.py")]
    if args.config:
        cmd += ["--config", os.path.abspath(args.config)]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env["RAY_TMPDIR"] = ray_tmp
    env["PYTHONUNBUFFERED"] = "1"
    machine = common.machine_info()
    common.print_header("default run", machine)
    print("command:", " ".join(cmd), flush=True)

    t_start = time.time()
    proc = subprocess.Popen(
        cmd,
        cwd=common.REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    sampler = Sampler(proc.pid, args.sample_s)
    sampler.start()
    marks: list[tuple[str, float, float]] = [("start", 0.0, 0.0)]
    seen: set[str] = set()
    warnings: list[str] = []
    log_lines: list[str] = []
    precision = "not printed"

    def mark(name: str) -> None:
        if name not in seen:
            seen.add(name)
            marks.append((name, time.time() - t_start, sampler.sample()))

    assert proc.stdout is not None
    for line in proc.stdout:
        log_lines.append(line)
        sys.stdout.write(line)
        if RAY_STARTED_RE.search(line):
            mark("ray_started")
        elif line.startswith("preprocess"):
            mark("preprocess_started")
        elif "[pose2seg] MLflow run" in line:
            mark("training_started")
        elif m := VALIDATING_RE.search(line):
            mark(f"epoch{m.group(1)}_trained")
        elif m := EPOCH_RE.search(line):
            mark(f"epoch{m.group(1)}_validated")
        elif line.startswith("=" * 20) and "epochs_done" not in seen:
            mark("epochs_done")  # the summary's first rule
        if (m := PRECISION_RE.search(line)) and "precision" not in seen:
            seen.add("precision")
            precision = m.group(1).strip()
        if WARNING_RE.search(line):
            warnings.append(line.strip())
    rc = proc.wait()
    mark("exited")
    sampler.stop.set()
    wall = time.time() - t_start

    names = [m[0] for m in marks]

    def span(a: str, b: str) -> dict[str, float] | None:
        if a not in names or b not in names:
            return None
        (_, wa, ca), (_, wb, cb) = marks[names.index(a)], marks[names.index(b)]
        return {"wall_s": round(wb - wa, 2), "cpu_s": round(cb - ca, 2)}

    epochs = sorted({int(m.group(1)) for n in names if (m := re.match(r"epoch(\d+)_", n))})
    phases: dict[str, Any] = {
        "startup": span("start", "ray_started"),
        "generate": span("ray_started", "preprocess_started"),
        "preprocess": span("preprocess_started", "training_started"),
        "epochs": [],
    }
    prev = "training_started"
    for e in epochs:
        phases["epochs"].append(
            {
                "epoch": e,
                "train": span(prev, f"epoch{e}_trained"),
                "validation": span(f"epoch{e}_trained", f"epoch{e}_validated"),
            }
        )
        prev = f"epoch{e}_validated"
    phases["log_and_register"] = span(prev, "epochs_done")
    phases["shutdown"] = span("epochs_done", "exited")
    census = worker_census(ray_tmp)
    result = {
        "label": args.label,
        "training_precision": precision,
        "cpu_native_bf16_flags": machine["cpu_native_bf16_flags"],
        "command": cmd,
        "returncode": rc,
        "wall_s": round(wall, 2),
        "cpu_s": round(sampler.cpu, 2),
        "phases": phases,
        "ray_worker_processes": census["python_worker_processes"],
        "ray_workers_by_task_or_actor": census["by_task_or_actor"],
        "worker_pool_warnings": len(warnings),
        "worker_pool_warning_lines": warnings[:5],
        "peak_pss_tree_bytes": sampler.peak_pss,
        "peak_pss_tree_gib": round(sampler.peak_pss / 2**30, 2),
        "peak_rss_sum_tree_gib": round(sampler.peak_rss / 2**30, 2),
        "peak_processes_in_tree": sampler.peak_procs,
        "marks": [{"mark": n, "t_s": round(w, 2), "cpu_s": round(c, 2)} for n, w, c in marks],
        "load_average_end": common.load_average(),
        "workdir": workdir if args.keep else None,
    }
    bf16 = ", ".join(machine["cpu_native_bf16_flags"]) or "none"
    print(
        f"\nprecision {precision}; CPU native bf16: {bf16}; wall {wall:.0f} s, CPU {sampler.cpu:.0f} s, Ray worker processes "
        f"{census['python_worker_processes']}, worker-pool warnings {len(warnings)}, "
        f"peak memory of the tree {sampler.peak_pss / 2**30:.2f} GiB (PSS; RSS summed "
        f"{sampler.peak_rss / 2**30:.2f} GiB)",
        flush=True,
    )
    print("wrote", common.write_json(args.out, result, machine=machine))
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    common.main_guard(main)
