"""Failures that a retry cannot fix, and the checkpoint a resume falls back to (issue 27,
items 8 and 10), without a Ray instance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pose2seg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pose2seg.config import Config
from preprocessing.epoch_reader import UnreadableParquetError
from workflows.train_failures import FailFastOnDataErrors, choose_resume_checkpoint, data_error


def _save(directory, epoch: int) -> None:
    model = torch.nn.Linear(2, 2)
    save_checkpoint(
        str(directory),
        model=model,
        config=Config(),
        templates=np.zeros((2, 17, 2), np.float32),
        state={"epoch": epoch},
        training_state={"optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict()},
    )


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_an_unreadable_checkpoint_file_is_named(tmp_path):
    _save(tmp_path / "ckpt", epoch=1)
    _truncate(tmp_path / "ckpt" / "training.pt")
    assert load_checkpoint(str(tmp_path / "ckpt")).state == {"epoch": 1}  # no training state
    with pytest.raises(CheckpointError, match=r"checkpoint file .*ckpt/training\.pt is unreadable"):
        load_checkpoint(str(tmp_path / "ckpt"), with_training_state=True)


def test_resume_plan_skips_unreadable_newest_checkpoints(tmp_path):
    run = tmp_path / "run"
    names = ["checkpoint_2026-12-05_10-00-00", "checkpoint_2026-12-05_10-01-00"]
    for epoch, name in enumerate(names, start=1):
        _save(run / name, epoch=epoch)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # a file, not a checkpoint
    assert choose_resume_checkpoint(str(run)).use is None  # the newest reads: Ray's choice
    _truncate(run / names[1] / "training.pt")
    plan = choose_resume_checkpoint(str(run))
    assert plan.use == str(run / names[0]) and plan.skip == [names[1]]
    assert "training.pt is unreadable" in plan.reasons[0]
    _truncate(run / names[0] / "model.pt")
    # None reads: Ray Train's registered checkpoint (if any) stands, the unreadable are listed.
    none_read = choose_resume_checkpoint(str(run))
    assert none_read.use is None and len(none_read.skip) >= 2
    assert choose_resume_checkpoint(str(tmp_path / "empty")).use is None


class _Wrapped(Exception):
    """Like Ray Train's UserExceptionWithTraceback: the worker's error in ``_base_exc``."""

    def __init__(self, base: BaseException):
        super().__init__("Traceback ...")
        self._base_exc = base


def test_data_errors_end_the_run_from_the_controller_and_others_are_retried():
    import ray.train

    bad = UnreadableParquetError("Parquet file x.parquet is unreadable (...)")
    assert data_error(_Wrapped(bad)) is bad
    assert data_error(_Wrapped(RuntimeError("a killed worker"))) is None
    callback = FailFastOnDataErrors()
    callback.after_exception(None, {0: _Wrapped(RuntimeError("lost node"))})  # retried
    with pytest.raises(ray.train.ControllerError) as info:
        callback.after_exception(None, {1: _Wrapped(RuntimeError("peer")), 0: _Wrapped(bad)})
    assert info.value.controller_failure is bad


def test_parquet_errors_tell_a_corrupt_file_from_a_storage_failure(monkeypatch):
    from preprocessing.epoch_reader import parquet_errors

    with pytest.raises(UnreadableParquetError, match=r"Parquet file s3://b/x\.parquet is unread"):
        with parquet_errors("s3://b/x.parquet"):
            raise OSError("Unexpected end of stream")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    with pytest.raises(
        OSError, match=r"s3://b/x\.parquet \(S3 endpoint http://127\.0\.0\.1:9000\)"
    ):
        with parquet_errors("s3://b/x.parquet"):
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: timeout")


def test_the_placement_timeout_bounds_ray_trains_start_up_retries(monkeypatch):
    from workflows.train_failures import START_TIMEOUT_ENV, placement_retry_limit

    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    assert placement_retry_limit(0) == -1  # no bound: Ray Train's own behaviour
    assert placement_retry_limit(900) == 14  # 15 attempts of 60 s
    assert placement_retry_limit(61) == 1
    assert placement_retry_limit(10) == 0  # one attempt, however short the bound
    monkeypatch.setenv(START_TIMEOUT_ENV, "5")
    assert placement_retry_limit(12) == 2
    assert placement_retry_limit(60, 15) == 3  # train.placement_attempt_s=15: 4 attempts


def test_the_placement_attempt_key_is_ray_trains_variable_during_fit_only(monkeypatch):
    import os

    from workflows.train_failures import START_TIMEOUT_ENV, placement_attempt, start_timeout_s

    monkeypatch.setenv(START_TIMEOUT_ENV, "30")
    ray_own = Config()
    assert start_timeout_s(ray_own) == 30.0  # 0: Ray's own setting
    with placement_attempt(ray_own):
        assert os.environ[START_TIMEOUT_ENV] == "30"
    quick = Config().with_overrides({"train.placement_attempt_s": 15})
    assert start_timeout_s(quick) == 15.0
    with placement_attempt(quick):
        assert os.environ[START_TIMEOUT_ENV] == "15"
    assert os.environ[START_TIMEOUT_ENV] == "30"
    monkeypatch.delenv(START_TIMEOUT_ENV)
    with pytest.raises(RuntimeError), placement_attempt(quick):
        assert os.environ[START_TIMEOUT_ENV] == "15"
        raise RuntimeError("fit failed")
    assert START_TIMEOUT_ENV not in os.environ
    with pytest.raises(ValueError, match=r"train\.placement_attempt_s"):
        Config().with_overrides({"train.placement_attempt_s": -1})


def test_ray_train_giving_up_on_placement_becomes_one_line(monkeypatch):
    import ray.train
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from workflows import cluster_checks
    from workflows.train_failures import START_TIMEOUT_ENV, WorkersNotPlacedError, placement_error

    monkeypatch.setenv(START_TIMEOUT_ENV, "2")
    nodes = [cluster_checks.NodeInfo("ab" * 28, {"CPU": 1.0, "lane_b": 0.0}, True)]
    monkeypatch.setattr(cluster_checks, "cluster_nodes", lambda: nodes)
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.5}, raising=False)
    config = Config().with_overrides(
        {
            "train.num_workers": 1,
            "train.worker_resources": {"lane_b": 1},
            "train.placement_timeout_s": 6,
        }
    )
    gave_up = ray.train.ControllerError(WorkerGroupStartupTimeoutError(num_workers=1))
    err = placement_error(gave_up, config, "run-x")
    assert isinstance(err, WorkersNotPlacedError) and isinstance(err, OSError)  # exit code 2
    line = str(err)
    assert "\n" not in line
    assert line.startswith("run-x: its 1 Train worker x (CPU 0.5, lane_b 1) could not be placed")
    assert "in 6 s (train.placement_timeout_s=6; 3 attempts of 2 s)" in line
    assert "the cluster has node abababab (head): CPU 1; free now: CPU 0.5" in line
    # Anything else is left as it is.
    assert placement_error(RuntimeError("x"), config, "run-x") is None
    other = ray.train.ControllerError(ValueError("bad"))
    assert placement_error(other, config, "run-x") is None
