"""The console of ``workflows/train.py`` as a user sees it (issue 27 item 11; issue 26 counted
the default run's lines): a real run in a subprocess with its own local Ray, stdout not a TTY.
The project's lines and the summary are there; Ray's, Ray Data's and Ray Train's INFO lines and
MLflow's known cautions are not, and Ray's lines are in its session log folder instead; a
worker that fails still gets its one-line reason on the console."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.helpers import tiny_overrides

pytestmark = pytest.mark.integration

# What the run printed before (issue 26's 57 lines, /work/runs' ~215): none may come back.
RAY_AND_MLFLOW_CHATTER = (
    "Started a local Ray instance",
    "Starting execution of Dataset",
    "Execution plan of Dataset",
    "Progress will be logged",
    "Running Dataset",
    "execution finished",
    "Data sink Parquet finished",
    "A new progress UI is available",
    "tqdm",
    "Requesting resources",
    "Attempting to start training worker group",
    "Started training worker group",
    "Setting up process group",
    "Moving model to device",
    "Wrapping provided model",
    "PreemptionWatcher",
    "core_worker.cc",
    "RayDeprecationWarning",
    "exclude_resources",
    "Reporting training result",
    "Checkpoint successfully created",
    "Add type hints to the `predict` method",
    "An input example was not provided",
    "Passing a Python object as `python_model`",
    "Saving pytorch model by Pickle",
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# An empty line a Ray worker printed, as its prefix alone: "(RayTrainWorker pid=123) ".
EMPTY_WORKER_LINE = re.compile(r"^\(\w+ pid=\d+(, ip=[\d.]+)?\)\s*$")
# What the switches of workflows/console.py set: a subprocess must find them unset, as a user's
# shell does (the test session's own init_ray set them in this process).
SET_BY_THE_PROJECT = (
    "RAY_DATA_LOGGING_CONFIG",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
    "POSE2SEG_DEBUG",
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
)


def _run(
    script: str, tmp_path: Path, overrides: dict, *, tag: str
) -> tuple[subprocess.CompletedProcess, Path]:
    """``python workflows/SCRIPT --set ...`` as a user runs it; returns the process and the
    Ray temp folder it used (removed by the caller)."""
    home = tmp_path / f"home-{tag}"  # Ray writes its token under ~/.ray
    home.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc-"))  # short: Ray's socket paths have a limit
    env = {k: v for k, v in os.environ.items() if k not in SET_BY_THE_PROJECT}
    env.update({"HOME": str(home), "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO_ROOT)})
    args = []
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "workflows" / script), *args],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc, ray_tmp


def _console(proc: subprocess.CompletedProcess) -> list[str]:
    return ANSI.sub("", proc.stdout + proc.stderr).splitlines()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("console-data")


def test_train_console_holds_the_projects_lines_and_rays_go_to_its_logs(tmp_path, data_dir):
    overrides = tiny_overrides(
        tmp_path,
        **{
            "data.root": str(data_dir / "synthetic"),
            "data.processed": str(data_dir / "processed"),
            "train.max_failures": 0,
        },
    )
    proc, ray_tmp = _run("train.py", tmp_path, overrides, tag="ok")
    try:
        lines = _console(proc)
        text = "\n".join(lines)
        assert proc.returncode == 0, text[-4000:]
        shown = [c for c in RAY_AND_MLFLOW_CHATTER if c in text]
        assert not shown, f"on the console: {shown}\n{text}"
        assert not [ln for ln in lines if EMPTY_WORKER_LINE.match(ln)], text
        for epoch in (1, 2):
            assert any(f"[pose2seg] epoch {epoch}/2  loss " in ln for ln in lines), text
        assert any("[pose2seg] 2 training workers started on 1 node" in ln for ln in lines), text
        for summary in ("run name ", "val segm AP ", "registered model ", "load it with "):
            assert any(ln.startswith(summary) for ln in lines), (summary, text)

        # One line says where Ray's own lines went, and they are there.
        (started,) = [ln for ln in lines if "started a local Ray instance" in ln]
        logs = Path(started.rsplit("Ray's own log lines: ", 1)[1].strip())
        assert logs.is_dir() and str(logs).startswith(str(ray_tmp)), started

        def logged(pattern: str, text: str) -> bool:
            return any(text in p.read_text(errors="replace") for p in logs.glob(pattern))

        assert logged("ray-data/ray-data.log", "execution finished")
        assert logged("train/ray-train-app-worker-*.log", "Reporting training result")
        assert logged("train/ray-train-sys-controller-*.log", "Started training worker group")
        assert logged("train/ray-train-sys-worker-*.log", "Checkpoint successfully created")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _corrupt_pages(path: Path) -> None:
    """Scramble the bytes between the header and the footer: the footer still reads (the
    driver lists the shard), its pages do not (the worker reading it fails)."""
    data = bytearray(path.read_bytes())
    for i in range(64, len(data) // 2, 5):
        data[i] = (data[i] * 31 + 7) % 256
    path.write_bytes(bytes(data))


def test_a_failing_worker_still_gets_its_reason_on_the_console(tmp_path, data_dir):
    """Ray's INFO lines are off the console, not its errors: a worker that fails on a corrupt
    shard ends the command with the reason on one line (exit 2)."""
    processed = tmp_path / "processed"
    overrides = tiny_overrides(
        tmp_path,
        **{
            "data.root": str(data_dir / "synthetic"),
            "data.processed": str(processed),
            "train.max_failures": 0,
            "train.epochs": 1,
            "registry.register": False,
        },
    )
    if not (data_dir / "processed").is_dir():  # run alone: the first test made none
        made, ray_tmp = _run(
            "preprocess.py",
            tmp_path,
            {**overrides, "data.processed": str(data_dir / "processed")},
            tag="preprocess",
        )
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert made.returncode == 0, made.stderr[-3000:]
    shutil.copytree(data_dir / "processed", processed)
    shards = sorted(processed.glob("*/train/*.parquet"))
    assert shards, list(processed.rglob("*"))
    for shard in shards:
        _corrupt_pages(shard)
    proc, ray_tmp = _run("train.py", tmp_path, overrides, tag="fail")
    shutil.rmtree(ray_tmp, ignore_errors=True)
    text = "\n".join(_console(proc))
    assert proc.returncode == 2, text[-4000:]
    reason = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert reason and "UnreadableParquetError" in reason[-1], text[-4000:]
    assert any(str(s) in reason[-1] for s in shards), reason[-1]
    assert "failed; continue it with --resume" in text  # the project's own line
    # And the MLflow run is not left RUNNING: FAILED (an interruption would be KILLED).
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=overrides["registry.tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("pose2seg").experiment_id])
    assert run.info.status == "FAILED"
