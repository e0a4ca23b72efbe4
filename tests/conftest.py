"""Shared fixtures: one local Ray instance per test session, a real S3 server on loopback,
a real SQLite-backed MLflow store."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
COCO_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "coco_person_sample"

# Ray 2.59+ turns on token auth for local clusters; tests use a disposable temp dir instead.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray-tests-"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# Fake S3 credentials before any Ray instance starts, so that its workers inherit them (they are
# never forwarded through a runtime_env, which Ray writes into its logs).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def coco_sample_dir() -> Path:
    """The real COCO person sample beside the repo; tests skip with a reason when absent."""
    if not (COCO_SAMPLE / "person_keypoints_sample.json").is_file():
        pytest.skip(
            f"real COCO sample not found at {COCO_SAMPLE} (../shared is not beside the repo)"
        )
    return COCO_SAMPLE


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray instance for the whole test session (2 CPUs, no dashboard)."""
    import ray

    from workflows.cli import init_ray

    init_ray(
        num_cpus=2,
        dashboard=False,
        progress_bars=False,
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto_server) on loopback; yields its endpoint URL.

    Sets fake credentials and AWS_ENDPOINT_URL for the session so boto3, pyarrow and MLflow
    all talk to it.
    """
    port = free_port()
    # The venv's moto_server first: an older one elsewhere on PATH breaks multipart uploads.
    venv_exe = Path(sys.executable).parent / "moto_server"
    exe = str(venv_exe) if venv_exe.exists() else shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server not found: install the dev extra (moto[server])")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start within 30 s")
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
        }
    )
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


_S3_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the loopback S3 server; yields its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    """A real SQLite-backed MLflow tracking store (with registry) in a temp dir."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def trained(ray_session, tmp_path_factory):
    """One tiny real training run (2 Ray Train workers, SQLite MLflow, registry), shared by
    the integration tests that inspect, evaluate or serve what it produced."""
    from tests.helpers import tiny_config
    from workflows.train_driver import run_training

    tmp_path = tmp_path_factory.mktemp("train")
    config = tiny_config(tmp_path)
    outcome = run_training(config)
    return config, outcome
