"""What the training job's driver does once ``fit`` returned (:func:`finish_tracking`: deliver
what the MLflow run lacks, log the best checkpoint as the model, register it, end the run), the
error when the tracking server never came back (:class:`TrackingUnavailableError`), and the
removal of checkpoint folders Ray Train never registered (:func:`prune_unregistered_checkpoints`)."""

from __future__ import annotations

import os
from typing import Any

from pose2seg.config import Config
from workflows.coco_metrics import VAL_METRIC
from workflows.mlflow_buffer import backfill_epoch_metrics


def prune_unregistered_checkpoints(result) -> list[str]:
    """Delete the run's ``checkpoint_*`` folders that Ray Train's checkpoint manager does not
    hold; returns their paths. A worker killed after rank 0 stored its epoch's checkpoint but
    before the controller registered it leaves such a folder: the restarted group redoes the
    epoch into a new folder, and ``CheckpointConfig(num_to_keep)`` only ever deletes what it
    registered, so the orphan stayed beside the kept ones for good. (Ray also keeps the
    latest checkpoint whatever its score, for a resume: ``num_to_keep`` + 1 folders when the
    latest is not among the best.)"""
    import pyarrow.fs

    if not getattr(result, "path", None):
        return []
    keep = {c.path.rstrip("/") for c, _ in (result.best_checkpoints or [])}
    if result.checkpoint is not None:
        keep.add(result.checkpoint.path.rstrip("/"))
    fs = result.filesystem
    removed = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(result.path, allow_not_found=True)):
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if info.type == pyarrow.fs.FileType.Directory and name.startswith("checkpoint_"):
            if info.path.rstrip("/") not in keep:
                fs.delete_dir(info.path)
                removed.append(info.path)
    return removed


class TrackingUnavailableError(ConnectionError):
    """Training finished but the MLflow tracking server never answered again: the metrics it
    missed and the registration are left to a later ``--resume`` (exit code 2, one line)."""


def finish_tracking(  # outcome: a train_driver.TrainOutcome, filled in here
    config: Config, handle, outcome: Any, ckpt, latest, returned, *, register
):
    """After a successful fit: deliver what the run lacks (epochs lost to a killed driver or a
    dead tracking server, from the checkpoint history), log the best checkpoint as the model,
    register it, end the run."""
    from workflows import mlflow_tracking as tracking

    history = outcome.history
    if not history and latest is not None:
        history = _checkpoint_history(latest)
    backfilled = backfill_epoch_metrics(
        handle, history, undelivered=[tuple(u) for u in returned.get("undelivered", [])]
    )
    if backfilled:
        print(f"[pose2seg] delivered {backfilled} metric values the MLflow run lacked", flush=True)
    do_register = config.registry.register if register is None else register
    if ckpt is not None:
        with ckpt.as_directory() as ckpt_dir:
            from pose2seg.checkpoint import load_checkpoint

            best_state = load_checkpoint(ckpt_dir).state
            best_ap = float(best_state.get("metrics", {}).get(VAL_METRIC, float("nan")))
            outcome.metrics["best_val_segm_ap"] = best_ap
            outcome.metrics["best_epoch"] = best_state.get("epoch")
            tracking.log_metrics(
                handle, {"best_val_segm_ap": best_ap}, step=int(best_state.get("epoch", 0))
            )
            from pose2seg.arch import architecture

            if architecture(config).servable:
                outcome.model_uri = tracking.log_pose2seg_model(handle, ckpt_dir)
            else:
                # The Mask R-CNN baseline is trained for comparison only: its metrics and
                # checkpoint are kept, but it is not served by the pose-based pyfunc.
                tracking.log_artifact_file(handle, os.path.join(ckpt_dir, "model.pt"), "baseline")
        if do_register and outcome.model_uri:
            outcome.registration = tracking.register_if_better(
                config, handle, outcome.model_uri, val_ap=best_ap
            )
    tracking.end_run(handle)


def _checkpoint_history(ckpt) -> list[dict[str, float]]:
    """The per-epoch metrics stored in a checkpoint (every epoch up to its own)."""
    from pose2seg.checkpoint import load_checkpoint

    with ckpt.as_directory() as ckpt_dir:
        return list(load_checkpoint(ckpt_dir).state.get("history", []))
