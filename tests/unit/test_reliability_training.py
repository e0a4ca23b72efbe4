"""Issue 27, the training half, without Ray: duplicate annotation ids (item 1), the MLflow
backfill and buffer (items 2 and 3), the experiment kind tag (item 11)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from preprocessing.coco import CocoPersonDataset

SAMPLE_JSON = "person_keypoints_sample.json"


# --------------------------------------------------------------------------------------------
# 1. Duplicate annotation ids: rejected in preprocessing, left out of the evaluated ground truth
# --------------------------------------------------------------------------------------------


def _sample_with_a_duplicate_id(coco_sample_dir: Path, tmp_path: Path) -> tuple[Path, int]:
    """The 4-image sample with annotation 460541 (image 196141) renumbered to 442619, the id of
    the person of image 785: one id, two people in two images."""
    data = json.loads((coco_sample_dir / SAMPLE_JSON).read_text())
    for ann in data["annotations"]:
        if ann["id"] == 460541:
            ann["id"] = 442619
    for image in data["images"]:
        shutil.copy(coco_sample_dir / image["file_name"], tmp_path / image["file_name"])
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(data))
    return path, 442619


def _perfect_results(dataset: CocoPersonDataset) -> list[dict]:
    """The reader's people written back as COCO results (their own masks, score 1)."""
    results = []
    for record, _ in dataset.iter_records():
        for person in record.people:
            rle = mask_utils.encode(np.asfortranarray(person.mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append(
                {"image_id": record.image_id, "category_id": 1, "segmentation": rle, "score": 1.0}
            )
    return results


def test_a_duplicated_annotation_id_is_rejected_and_perfect_masks_score_ap_1(
    coco_sample_dir, tmp_path
):
    from workflows.coco_metrics import coco_segm_metrics
    from workflows.eval_io import load_gt

    path, dup = _sample_with_a_duplicate_id(coco_sample_dir, tmp_path)
    dataset = CocoPersonDataset(str(path), str(tmp_path), split="val")
    rejected = [r for r in dataset.dataset_rejections if r.reason == "duplicate_annotation_id"]
    assert [(r.annotation_id, r.image_id) for r in rejected] == [(dup, 785), (dup, 196141)]
    assert f"annotation id {dup} appears 2 times" in rejected[0].detail
    assert "image ids 785, 196141" in rejected[0].detail and str(path) in rejected[0].detail
    assert rejected[0].file_name == "000000000785.jpg"
    people = {p.annotation_id for rec, _ in dataset.iter_records() for p in rec.people}
    assert dup not in people and len(people) == 12  # 14 in the sample, both copies out

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        gt = load_gt(str(path))
    assert dup not in {a["id"] for a in gt["annotations"]}
    (warning,) = stderr.getvalue().splitlines()
    assert str(path) in warning and f"id {dup} in image ids 785, 196141" in warning
    # pycocotools indexes by id: with both copies in the ground truth this scored 0.842.
    assert coco_segm_metrics(gt, _perfect_results(dataset))["segm_ap"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# 2, 3. Rank 0's metrics buffered while the server is unreachable; the driver's backfill
# --------------------------------------------------------------------------------------------


def _dead_uri() -> str:
    from tests.conftest import free_port

    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One real SQLite MLflow store for the module (creating one costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def store(store_uri):
    """A new RUNNING run in the module's store; yields (client, handle)."""
    from mlflow import MlflowClient

    from workflows.mlflow_tracking import RunHandle, ensure_experiment

    client = MlflowClient(tracking_uri=store_uri)
    exp_id = ensure_experiment(client, "pose2seg", store_uri)
    run = client.create_run(exp_id)
    return client, RunHandle(tracking_uri=store_uri, run_id=run.info.run_id, experiment_id=exp_id)


def test_metrics_wait_in_the_buffer_while_the_server_is_down_and_warn_once(store, monkeypatch):
    from workflows.mlflow_buffer import MetricBuffer

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client, handle = store
    now = [0.0]
    lines: list[str] = []
    down = type(handle)(tracking_uri=_dead_uri(), run_id=handle.run_id, experiment_id="0")
    buffer = MetricBuffer(down, retry_every_s=30, clock=lambda: now[0], echo=lines.append)
    t0 = time.time()
    assert buffer.log({"train_loss": 1.0, "lr": 0.1}, step=1) is False  # no exception
    assert buffer.log({"train_loss": 0.5, "lr": float("nan")}, step=2) is False
    assert time.time() - t0 < 20
    assert len(lines) == 1 and "unreachable" in lines[0] and down.tracking_uri in lines[0]
    assert [(m.key, m.step) for m in buffer.pending] == [
        ("train_loss", 1),
        ("lr", 1),
        ("train_loss", 2),
    ]
    # The server "comes back" (the same run through a store that answers): delivered once.
    buffer.handle, buffer._client = handle, None
    assert buffer.flush() is False  # retried at most every 30 s
    now[0] = 31.0
    assert buffer.flush() is True and not buffer.pending
    assert len(lines) == 2 and "answers again" in lines[1]
    assert sorted(m.step for m in client.get_metric_history(handle.run_id, "train_loss")) == [1, 2]


def test_a_step_the_run_already_holds_is_not_logged_again(store):
    """An epoch trained again (its first checkpoint never registered) keeps one value a step."""
    from workflows.mlflow_buffer import MetricBuffer

    client, handle = store
    first = MetricBuffer(handle, echo=lambda line: None)
    assert first.log({"epoch": 1, "train_loss": 0.9}, step=1)
    again = MetricBuffer(handle, echo=lambda line: None)  # the restarted rank 0
    assert again.log({"epoch": 1, "train_loss": 0.8}, step=1)
    assert again.log({"epoch": 2, "train_loss": 0.7}, step=2)
    assert [m.step for m in client.get_metric_history(handle.run_id, "epoch")] == [1, 2]
    losses = {m.step: m.value for m in client.get_metric_history(handle.run_id, "train_loss")}
    assert losses == {1: 0.9, 2: 0.7}
    # What was left out, and differs: epoch 1's loss (its "epoch" value is the same, 1).
    assert again.superseded == [("train_loss", 1, 0.9, 0.8)]
    assert again.superseded_steps("train_loss") == [1] and again.superseded_steps("epoch") == []


def test_an_epoch_trained_again_is_named_in_the_runs_redone_epochs_tag(store):
    """Its MLflow values stay the first attempt's: the run says which epochs those are, merged
    over every rank 0 the run had; a value delivered twice unchanged (a retried batch) is not
    a redone epoch."""
    import json
    from types import SimpleNamespace

    from workflows.mlflow_buffer import MetricBuffer
    from workflows.mlflow_tracking import REDONE_EPOCHS_TAG
    from workflows.train_worker import _note_redone_epochs

    client, handle = store
    first = MetricBuffer(handle, echo=lambda line: None)
    for epoch, loss in ((1, 0.9), (2, 0.8), (3, 0.7)):
        first.log({"epoch": epoch, "train_loss": loss}, step=epoch)

    def tag():
        return client.get_run(handle.run_id).data.tags.get(REDONE_EPOCHS_TAG)

    same = SimpleNamespace(
        metrics_log=MetricBuffer(handle, echo=lambda line: None), redone_noted=[]
    )
    same.metrics_log.log({"epoch": 3, "train_loss": 0.7}, step=3)  # delivered again, unchanged
    _note_redone_epochs(same)
    assert tag() is None
    # A restarted rank 0 trains epoch 3 again; a later one epochs 2 and 3.
    again = SimpleNamespace(
        metrics_log=MetricBuffer(handle, echo=lambda line: None), redone_noted=[]
    )
    again.metrics_log.log({"epoch": 3, "train_loss": 0.75}, step=3)
    _note_redone_epochs(again)
    assert json.loads(tag()) == [3] and again.redone_noted == [3]
    later = SimpleNamespace(
        metrics_log=MetricBuffer(handle, echo=lambda line: None), redone_noted=[]
    )
    later.metrics_log.log({"epoch": 2, "train_loss": 0.85}, step=2)
    _note_redone_epochs(later)
    assert json.loads(tag()) == [2, 3]


def test_errors_other_than_reachability_still_raise(store):
    from mlflow.exceptions import MlflowException

    from workflows.mlflow_buffer import MetricBuffer

    _, handle = store
    missing = type(handle)(tracking_uri=handle.tracking_uri, run_id="0" * 32, experiment_id="0")
    with pytest.raises(MlflowException):
        MetricBuffer(missing).log({"train_loss": 1.0}, step=1)


def test_backfill_logs_only_the_epochs_the_run_lacks(store):
    from workflows.mlflow_buffer import backfill_epoch_metrics
    from workflows.mlflow_tracking import log_metrics

    client, handle = store
    history = [
        {"epoch": 1.0, "train_loss": 0.9},
        {"epoch": 2.0, "train_loss": 0.7},
        {"epoch": 3.0, "train_loss": 0.6},
    ]
    log_metrics(handle, history[1], step=2)  # only epoch 2 made it (a driver killed at 1 and 3)
    undelivered = [("step_loss", 0.8, 1, 4)]
    assert backfill_epoch_metrics(handle, history, undelivered=undelivered) == 5
    assert backfill_epoch_metrics(handle, history, undelivered=undelivered) == 0  # idempotent
    for key in ("epoch", "train_loss"):
        assert sorted(m.step for m in client.get_metric_history(handle.run_id, key)) == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(handle.run_id, "step_loss")] == [4]


def test_bounded_http_waits_keep_what_the_user_set(monkeypatch):
    from workflows.mlflow_buffer import HTTP_WAIT_DEFAULTS, bound_http_waits

    for key in HTTP_WAIT_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "45")
    bound_http_waits()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "45"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"


def test_what_a_worker_logs_first_waits_a_bounded_time_for_a_dead_server(monkeypatch):
    """A Ray worker (or a Tune trial) is a fresh process: its first MLflow call, rank 0's
    params at start, must not use MLflow's default 7 retries (about 4 minutes per call for a
    server that is gone). A Tune trial's workers did (seen re-running the battery)."""
    import threading

    from mlflow.entities import Param

    from workflows import mlflow_tracking as tracking
    from workflows.mlflow_buffer import HTTP_WAIT_DEFAULTS, is_unreachable

    for key in HTTP_WAIT_DEFAULTS:
        monkeypatch.delenv(key, raising=False)  # as in a new worker process
    handle = tracking.RunHandle("http://127.0.0.1:9", "0" * 32, "0")  # nothing listens there
    calls = {
        "log_params": lambda: tracking.log_params(handle, {"train.precision_resolved": "fp32"}),
        "set_tags": lambda: tracking.set_tags(handle, {"pose2seg.worker_nodes": "[]"}),
        "log_metrics": lambda: tracking.log_metrics(handle, {"epoch": 1.0}, step=1),
        "end_run": lambda: tracking.end_run(handle),
        "raw client": lambda: tracking.run_client(handle).log_batch(
            handle.run_id, params=[Param("a", "1")]
        ),
    }
    for name, call in calls.items():
        failure: list[BaseException] = []

        def run(call=call, failure=failure) -> None:
            try:
                call()
            except Exception as exc:
                failure.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        t0 = time.monotonic()
        thread.start()
        thread.join(timeout=40)
        assert not thread.is_alive(), f"{name} still waiting after 40 s for a dead server"
        assert failure and is_unreachable(failure[0]), (name, failure)
        assert time.monotonic() - t0 < 40


# --------------------------------------------------------------------------------------------
# 11. The experiment opens on "Training runs": mlflow.experimentKind, new or reused
# --------------------------------------------------------------------------------------------


def test_the_experiment_is_tagged_as_model_development_when_created_or_reused(store_uri):
    from mlflow import MlflowClient

    from workflows.mlflow_tracking import ensure_experiment

    uri = store_uri
    client = MlflowClient(tracking_uri=uri)
    new_id = ensure_experiment(client, "fresh", uri)
    old_id = client.create_experiment("older")  # made before the tag existed
    assert ensure_experiment(client, "older", uri) == old_id
    for exp_id in (new_id, old_id):
        tags = client.get_experiment(exp_id).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development"


def _first_use_of_the_store(uri: str) -> str:
    from workflows.mlflow_tracking import client_for, ensure_experiment

    try:
        ensure_experiment(client_for(uri), "pose2seg", uri)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return "ok"


def test_commands_started_at_once_on_a_new_sqlite_store_both_create_it(tmp_path):
    """Two ``train.py`` started at once on a new ``mlflow.db`` both ran MLflow's migrations
    and both died (exit 1, a traceback) — seen re-running the battery."""
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        outcomes = pool.map(_first_use_of_the_store, [uri] * 3)
    assert outcomes == ["ok"] * 3, outcomes
