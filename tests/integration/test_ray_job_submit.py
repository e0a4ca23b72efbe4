"""The cluster path as a user runs it: a separate Ray head (``ray start --head``) on this machine,
and ``ray job submit --working-dir . -- python workflows/<step>.py --set ...`` for preprocess,
train, evaluate and tune, each waited on until SUCCEEDED and its result read back (job logs and
the SQLite MLflow store the job wrote).

The head is stopped by its own process ids, never with ``ray stop`` (which would also stop the
test session's local Ray instance of ``ray_session``). The head keeps its address file in its
own ``--temp-dir``, so a later bare ``ray.init()`` in the test process (another RAY_TMPDIR) does
not auto-join it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent
# Never uploaded with --working-dir (Ray also honours .gitignore, this is belt and braces).
EXCLUDES = [
    ".venv",
    ".git",
    "data",
    "runs",
    "mlruns",
    "mlartifacts",
    "outputs",
    "*.db",
    "*.db-journal",
    "**/__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "benchmarks",
]
JOB_TIMEOUT_S = 420


def _ray_exe() -> str:
    exe = VENV_BIN / "ray"
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def _head_pids(temp_dir: str) -> set[int]:
    """Every process of the head: GCS, raylet, dashboard and monitors name its private temp dir
    on their command line; workers, agents and job drivers inherit ``RAY_TMPDIR=<temp_dir>``
    from it. Other Ray instances on the machine (the session's ``ray_session``) are left alone."""
    needle_cmd, needle_env = temp_dir.encode(), f"RAY_TMPDIR={temp_dir}".encode()
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = fh.read().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if needle_cmd in cmdline or needle_env in environ:
            pids.add(int(entry))
    return pids


def _stop_head(temp_dir: str, grace_s: float = 15.0) -> None:
    """SIGTERM every process of the head, SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _head_pids(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + grace_s
        while pids and time.time() < deadline:
            time.sleep(0.5)
            pids = _head_pids(temp_dir)
        if not pids:
            return


def _head_env(temp_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    # The head (and so every job driver it starts) uses this venv's python.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_TMPDIR"] = temp_dir
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def ray_head():
    """A separate Ray head with the dashboard/Jobs API on free loopback ports; yields its
    dashboard URL, stopped (by pid) at teardown."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: unix socket paths
    gcs_port, dash_port = free_port(), free_port()
    env = _head_env(temp_dir)
    cmd = [
        _ray_exe(),
        "start",
        "--head",
        f"--port={gcs_port}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        "--num-cpus=2",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        # Other Ray instances on the machine hold the default ports (e.g. the dashboard
        # agent's 52365: the Jobs API then answers "No available agent to submit job").
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
    ]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    url = f"http://127.0.0.1:{dash_port}"
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the Ray dashboard at {url} did not come up in 120 s")
            time.sleep(1)
        yield {"url": url, "env": env, "temp_dir": temp_dir}
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(head: dict, args: list[str], *, env_vars: dict[str, str] | None = None) -> str:
    """``ray job submit --working-dir . ... -- python <args>`` from the repo root; returns the
    job's output (the CLI streams its logs) after asserting it SUCCEEDED."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    runtime_env = {"excludes": EXCLUDES, "env_vars": env_vars or {}}
    cmd = [
        _ray_exe(),
        "job",
        "submit",
        "--address",
        head["url"],
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        *args,
    ]
    t0 = time.time()
    for _ in range(15):
        done = subprocess.run(
            cmd,
            cwd=REPO_ROOT,
            env=head["env"],
            capture_output=True,
            text=True,
            timeout=JOB_TIMEOUT_S,
        )
        out = done.stdout + done.stderr
        # Just after start-up the head's job agent may not be registered yet: nothing was
        # submitted, so submitting again is safe.
        if "No available agent to submit job" not in out:
            break
        time.sleep(2)
    match = re.search(r"Job '([^']+)' submitted successfully", out)
    assert match, out[-4000:]
    client = JobSubmissionClient(head["url"])
    status = client.get_job_status(match.group(1))
    assert status == JobStatus.SUCCEEDED, f"{status}\n{out[-6000:]}"
    assert done.returncode == 0, out[-4000:]
    print(f"[job] {args[0]}: SUCCEEDED in {time.time() - t0:.0f} s")
    return client.get_job_logs(match.group(1))


def _sets(overrides: dict[str, object]) -> list[str]:
    return [arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def job_config(tmp_path_factory):
    """Tiny-config overrides, every path absolute (a job runs in its own working-dir copy)."""
    from tests.helpers import tiny_config

    tmp = tmp_path_factory.mktemp("jobs")
    config = tiny_config(
        tmp,
        **{
            "train.epochs": 1,
            "eval.output_dir": str(tmp / "outputs"),
            "eval.num_overlays": 1,
        },
    )
    keys = [
        k
        for k in config.to_flat()
        if k.startswith(("data.", "model.", "train.", "registry.", "eval."))
        and k not in ("eval.occlusion_bins",)
    ]
    flat = config.to_flat()
    defaults = type(config)().to_flat()
    overrides = {k: flat[k] for k in keys if flat[k] != defaults[k]}
    return config, overrides


def test_preprocess_train_evaluate_tune_as_submitted_jobs(ray_head, job_config):
    from mlflow import MlflowClient

    config, overrides = job_config
    sets = _sets(overrides)
    timings = {}

    t0 = time.time()
    logs = submit(ray_head, ["workflows/preprocess.py", *sets])
    timings["preprocess"] = time.time() - t0
    assert "train: images in 16, rows out 16" in logs, logs[-3000:]
    assert os.path.isfile(os.path.join(config.data.processed, config.preprocess_key(), "meta.json"))

    t0 = time.time()
    logs = submit(ray_head, ["workflows/train.py", *sets])
    timings["train"] = time.time() - t0
    run_id = re.search(r"MLflow run id\s+(\w+)", logs).group(1)
    ap = float(re.search(r"val segm AP\s+([0-9.]+)", logs).group(1))
    assert 0.0 <= ap <= 1.0
    assert "alias @champion moved to it" in logs
    client = MlflowClient(tracking_uri=config.registry.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.roi_size"] == str(config.model.roi_size)
    assert abs(run.data.metrics["best_val_segm_ap"] - ap) < 1e-3
    holder = client.get_model_version_by_alias(config.registry.model_name, "champion")
    assert holder.run_id == run_id

    t0 = time.time()
    model_ref = f"models:/{config.registry.model_name}@champion"
    logs = submit(ray_head, ["workflows/evaluate.py", "--model", model_ref, *sets])
    timings["evaluate"] = time.time() - t0
    eval_ap = float(re.search(r"segm AP ([0-9.]+)", logs).group(1))
    eval_run = re.search(r"MLflow run: (\w+)", logs).group(1)
    assert 0.0 <= eval_ap <= 1.0
    assert client.get_run(eval_run).data.metrics["val_segm_ap"] == pytest.approx(eval_ap, abs=1e-4)
    results = re.search(r"results: (\S+)", logs).group(1)
    assert results.startswith(config.eval.output_dir) and os.path.isfile(results)

    t0 = time.time()
    tune_sets = _sets(
        {
            "tune.search_space": '{"model.skeleton_features": ["both"]}',
            "tune.grace_period": 1,
            "tune.name": "jobtune",
            "registry.register": "false",
            # A trial driver plus two workers on a 2-CPU head must leave Ray Data room to read.
            "tune.cpus_per_trial_driver": 0.25,
            "train.cpus_per_worker": 0.25,
        }
    )
    logs = submit(ray_head, ["workflows/tune.py", *sets, *tune_sets])
    timings["tune"] = time.time() - t0
    assert "search finished" in logs, logs[-3000:]
    assert os.path.isdir(os.path.join(config.train.storage_path, "jobtune"))
    print("[job] timings (s):", {k: round(v) for k, v in timings.items()})
