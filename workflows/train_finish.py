"""What the training job's driver does once ``fit`` returned (:func:`finish_tracking`: deliver
what the MLflow run lacks, log the best checkpoint as the model, register it, end the run), what
a Tune trial's driver does (:func:`finish_trial_run`), the error when the tracking server never
came back (:class:`TrackingUnavailableError`), and the removal of checkpoint folders Ray Train
never registered (:func:`prune_unregistered_checkpoints`)."""

from __future__ import annotations

import os
from typing import Any

from pose2seg.config import Config
from workflows.coco_metrics import VAL_METRIC
from workflows.mlflow_buffer import _stderr_line, backfill_epoch_metrics, is_unreachable


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


def finish_trial_run(handle, result, *, run_name: str, echo=None) -> bool:
    """A Tune trial's end of its MLflow run (``handle``) after ``fit`` returned ``result``:
    deliver what the run lacks (epochs and the metrics rank 0 kept while the tracking server
    was down), then end it. A server that does not answer (MLflow's waits are bounded) is not
    the trial's failure: Tune already holds its results, so one warning line and False; the
    run stays RUNNING until the search's driver (or ``tune.py --resume``) ends it. Any other
    MLflow error raises. True when the run was ended."""
    from workflows import mlflow_tracking as tracking

    returned = getattr(result, "return_value", None) or {}
    undelivered = [tuple(u) for u in returned.get("undelivered", [])]
    try:
        backfill_epoch_metrics(handle, returned.get("history", []), undelivered=undelivered)
        tracking.end_run(handle)
    except Exception as exc:
        if not is_unreachable(exc):
            raise
        (echo or _stderr_line)(
            f"[pose2seg] warning: trial {run_name} finished, but the MLflow tracking server "
            f"{tracking.redact_uri(handle.tracking_uri)} does not answer ({type(exc).__name__}): "
            f"its run {handle.run_id} is not ended and may lack metrics; the trial's result "
            "counts"
        )
        return False
    return True


def _checkpoint_history(ckpt) -> list[dict[str, float]]:
    """The per-epoch metrics stored in a checkpoint (every epoch up to its own)."""
    from pose2seg.checkpoint import load_checkpoint

    with ckpt.as_directory() as ckpt_dir:
        return list(load_checkpoint(ckpt_dir).state.get("history", []))
