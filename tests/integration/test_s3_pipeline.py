"""One full pipeline with every store on a real S3-compatible server on loopback (moto_server)
and an MLflow tracking server (SQLite backend, artifacts proxied to S3) on loopback:

generate (raw dataset -> s3://B/raw) -> preprocess (Parquet -> s3://B/processed) -> train
(Ray Train storage s3://B/runs, MLflow through the server, artifacts -> s3://B/mlflow) ->
register -> evaluate (``models:/...@champion`` through the server).

Then the credentials check: the run had a distinctive AWS secret in the environment; it must
appear in no MLflow param/tag/metric, no artifact, no checkpoint or other object in the bucket,
no Parquet/meta.json, no file the run wrote locally, no Ray session log, nothing printed.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port
from tests.helpers import tiny_config
from workflows.local_cluster import mlflow_server_argv

pytestmark = pytest.mark.integration

MODEL_NAME = "pose2seg-s3"
STATE: dict = {}  # what the pipeline test produced, inspected by the leak test


@pytest.fixture(scope="module")
def secret_env(s3_server):
    """Distinctive fake credentials in the environment for this module (moto accepts any)."""
    secret = f"sekret-{uuid.uuid4().hex}"
    key_id = f"AKIATEST{uuid.uuid4().hex[:12].upper()}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"] = key_id
    os.environ["AWS_SECRET_ACCESS_KEY"] = secret
    yield {"secret": secret, "key_id": key_id, "endpoint": s3_server}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def bucket(secret_env):
    import boto3

    name = f"pipe-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=secret_env["endpoint"]).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def mlflow_server(secret_env, bucket, tmp_path_factory):
    """``mlflow server`` on loopback: SQLite backend, artifacts proxied to s3://bucket/mlflow."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_S3_ENDPOINT_URL": secret_env["endpoint"],
        }
    )
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        mlflow_server_argv(f"sqlite:///{tmp / 'mlflow.db'}", f"s3://{bucket}/mlflow", port),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(
                f"mlflow server did not become healthy: {(tmp / 'server.log').read_text()[-3000:]}"
            )
        time.sleep(1)
    yield {"url": url, "db": tmp / "mlflow.db", "log": tmp / "server.log"}
    import signal

    os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker, nothing else
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    log.close()


def _keys(bucket: str, prefix: str) -> list[str]:
    from preprocessing.storage import s3_client

    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _run_pipeline(spec: dict) -> dict:
    """generate -> preprocess -> train (+ register) -> evaluate, on a Ray instance started here.

    Runs in a driver subprocess (see the test): every Ray process then inherits the AWS
    environment at start-up, as on a cluster node. The session's shared ``ray_session`` cannot
    serve here: it may have been started before the credentials were set, and Ray Train
    workers (unlike the preprocessing tasks) get no forwarded environment.
    """
    import ray

    from pose2seg.config import Config
    from preprocessing.synthetic import ensure_synthetic_dataset
    from workflows.cli import init_ray
    from workflows.evaluate import run_evaluate
    from workflows.preprocess import run_preprocess
    from workflows.train_driver import run_training

    config = Config.from_flat(spec["config"])
    init_ray(num_cpus=2, dashboard=False, progress_bars=False)
    timings = {}
    t0 = time.time()
    ensure_synthetic_dataset(config)
    timings["generate"] = time.time() - t0
    t0 = time.time()
    summary = run_preprocess(config)
    timings["preprocess"] = time.time() - t0
    t0 = time.time()
    outcome = run_training(config)
    timings["train"] = time.time() - t0
    t0 = time.time()
    evaluation = run_evaluate(config, model_ref=f"models:/{MODEL_NAME}@champion")
    timings["evaluate"] = time.time() - t0
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    ray.shutdown()
    return {
        "train_rows": summary.splits["train"].rows_out,
        "run_name": outcome.run_name,
        "run_id": outcome.mlflow_run_id,
        "checkpoint_path": outcome.checkpoint_path,
        "alias_moved": bool(outcome.registration and outcome.registration.alias_moved),
        "eval_ap": evaluation.metrics["segm_ap"],
        "eval_run_id": evaluation.mlflow_run_id,
        "session_dir": session_dir,
        "timings": timings,
    }


def test_full_pipeline_with_every_store_on_s3(secret_env, bucket, mlflow_server, tmp_path):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from preprocessing.storage import read_bytes

    base = f"s3://{bucket}"
    config = tiny_config(
        tmp_path,
        **{
            "data.root": f"{base}/raw",
            "data.processed": f"{base}/processed",
            "train.storage_path": f"{base}/runs",
            "train.epochs": 1,
            "registry.tracking_uri": mlflow_server["url"],
            "registry.model_name": MODEL_NAME,
            "eval.output_dir": str(tmp_path / "outputs"),
            "eval.num_overlays": 1,
        },
    )
    spec_path, result_path = tmp_path / "spec.json", tmp_path / "result.json"
    spec_path.write_text(json.dumps({"config": config.to_flat()}))
    env = dict(os.environ)
    env.update(
        {
            "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-s3-", dir="/tmp"),
            "RAY_AUTH_MODE": "disabled",
            "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
        }
    )
    env.pop("RAY_ADDRESS", None)
    code = (
        "import json, sys; from tests.integration.test_s3_pipeline import _run_pipeline; "
        "spec = json.load(open(sys.argv[1])); "
        "json.dump(_run_pipeline(spec), open(sys.argv[2], 'w'))"
    )
    t0 = time.time()
    done = subprocess.run(
        [sys.executable, "-c", code, str(spec_path), str(result_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-6000:]
    result = json.loads(result_path.read_text())
    print(f"[s3 pipeline] {time.time() - t0:.0f} s; steps (s): {result['timings']}")

    # Every store holds what it should.
    assert any(k.endswith("person_keypoints_train.json") for k in _keys(bucket, "raw/"))
    assert result["train_rows"] == config.data.synthetic_num_train
    processed = _keys(bucket, f"processed/{config.preprocess_key()}/")
    assert any(k.endswith("meta.json") for k in processed)
    assert any("/train/" in k and k.endswith(".parquet") for k in processed)
    assert result["checkpoint_path"].startswith(f"{bucket}/runs/{result['run_name']}/")
    assert any(k.endswith("model.pt") for k in _keys(bucket, f"runs/{result['run_name']}/"))
    assert result["alias_moved"]
    mlflow_keys = _keys(bucket, "mlflow/")
    assert any(k.endswith("MLmodel") for k in mlflow_keys), mlflow_keys
    assert any(f"/{result['eval_run_id']}/" in k for k in mlflow_keys)

    client = MlflowClient(tracking_uri=mlflow_server["url"])
    assert client.get_run(result["run_id"]).info.status == "FINISHED"
    eval_run = client.get_run(result["eval_run_id"])
    assert eval_run.data.metrics["val_segm_ap"] == pytest.approx(result["eval_ap"])

    # The registered model loads back through the server (artifacts proxied from S3).
    mlflow.set_tracking_uri(mlflow_server["url"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    gt = json.loads(read_bytes(f"{base}/raw/annotations/person_keypoints_val.json"))
    image = gt["images"][0]
    people = [
        a["keypoints"]
        for a in gt["annotations"]
        if a["image_id"] == image["id"] and any(a["keypoints"][2::3])
    ]
    frame = pd.DataFrame(
        {
            "image": [read_bytes(f"{base}/raw/images/val/{image['file_name']}")],
            "keypoints": [json.dumps(people)],
            "image_id": [image["id"]],
        }
    )
    assert len(model.predict(frame)) == len(people)
    STATE.update(config=config, printed=printed, tmp_path=tmp_path, **result)


def _contains(data: bytes, secret: str) -> bool:
    return secret.encode() in data


def _parquet_text(data: bytes) -> str:
    """Schema metadata and every string value of a Parquet file (the file is compressed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    parts = [str(table.schema.metadata or {})]
    for name in table.column_names:
        col = table.column(name)
        typ = col.type
        if pa.types.is_string(typ) or pa.types.is_large_string(typ):
            parts.extend(str(v) for v in col.to_pylist())
        elif pa.types.is_list(typ) and pa.types.is_string(typ.value_type):
            parts.extend(json.dumps(v) for v in col.to_pylist())
    return "\n".join(parts)


def test_no_secret_in_tracking_storage_files_or_output(secret_env, bucket, mlflow_server):
    from mlflow import MlflowClient

    from preprocessing.storage import s3_client

    if not STATE:
        pytest.skip("the pipeline test did not run")
    secret = secret_env["secret"]
    leaks: list[str] = []

    # MLflow: every run's params, tags and metric keys; registered model and version tags.
    client = MlflowClient(tracking_uri=mlflow_server["url"])
    experiment = client.get_experiment_by_name(STATE["config"].registry.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) >= 2  # the training run and the evaluation run
    for run in runs:
        for kind, values in (
            ("param", run.data.params),
            ("tag", run.data.tags),
            ("metric", {k: str(v) for k, v in run.data.metrics.items()}),
        ):
            for k, v in values.items():
                if secret in k or secret in v:
                    leaks.append(f"MLflow {kind} {k} of run {run.info.run_id}")
    for mv in client.search_model_versions(f"name='{MODEL_NAME}'"):
        if secret in json.dumps(mv.tags) or secret in (mv.source or ""):
            leaks.append(f"model version {mv.version} tags/source")
    if _contains(Path(mlflow_server["db"]).read_bytes(), secret):
        leaks.append("the MLflow backend database")

    # Every object in the bucket: raw data, Parquet + meta.json, checkpoints, MLflow artifacts.
    s3 = s3_client()
    keys = _keys(bucket, "")
    assert any(k.startswith("runs/") for k in keys) and any(k.startswith("mlflow/") for k in keys)
    for key in keys:
        data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        if _contains(data, secret):
            leaks.append(f"s3://{bucket}/{key}")
        elif key.endswith(".parquet") and secret in _parquet_text(data):
            leaks.append(f"s3://{bucket}/{key} (Parquet values)")

    # Local files the run wrote (evaluation outputs and anything else under its tmp dir).
    for path in Path(STATE["tmp_path"]).rglob("*"):
        if path.is_file() and _contains(path.read_bytes(), secret):
            leaks.append(str(path))

    # The Ray session's logs: runtime_env forwarding of AWS_* must not write them out.
    for path in Path(STATE["session_dir"], "logs").rglob("*"):
        try:
            if path.is_file() and _contains(path.read_bytes(), secret):
                leaks.append(f"Ray log {path}")
        except OSError:
            pass

    if secret in STATE["printed"]:
        leaks.append("printed output (stdout/stderr)")
    assert not leaks, "the AWS secret leaked into:\n" + "\n".join(leaks)


def test_config_holds_no_credentials_and_params_are_masked():
    from pose2seg.config import Config
    from workflows.mlflow_tracking import _SECRET_MARKERS, loggable_params

    flat = Config().to_flat()
    # No configuration key is a credential: they come from the environment or the cloud role.
    assert not [k for k in flat if any(m in k.lower() for m in _SECRET_MARKERS)]
    masked = loggable_params(
        {
            "x.aws_secret_access_key": "s1",
            "x.api_token": "s2",
            "x.db_password": "s3",
            "model.roi_size": 16,
        }
    )
    assert masked["x.aws_secret_access_key"] == masked["x.api_token"] == "***"
    assert masked["x.db_password"] == "***" and masked["model.roi_size"] == "16"
    # A database password inside the one URI-valued key is masked too (and not printed).
    params = loggable_params(
        Config()
        .with_overrides({"registry.tracking_uri": "postgresql://mlflow:pw-42@db:5432/mlflow"})
        .to_flat()
    )
    assert params["registry.tracking_uri"] == "postgresql://mlflow:***@db:5432/mlflow"
    assert not [k for k, v in params.items() if "pw-42" in v]


def test_forwarded_environment_holds_no_credentials(monkeypatch):
    """preprocessing.pipeline forwards the S3 endpoint and region to Ray tasks through their
    runtime_env, never credentials: Ray writes a runtime_env into its logs."""
    from preprocessing.pipeline import _runtime_env

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekret-unit")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-unit")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    env = _runtime_env()
    assert env is not None and env["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert "sekret-unit" not in json.dumps(env) and "token-unit" not in json.dumps(env)
    config = tiny_config(Path("/tmp/x"))
    assert "sekret-unit" not in json.dumps(config.to_flat())
