"""The training job's driver, run in the job's own process (``train.py``, each Tune trial,
the benchmarks): :func:`prepare_data` (preprocess if needed, open the Parquet splits),
:func:`build_trainer` (a ``TorchTrainer`` over :func:`workflows.train_worker.train_loop_per_worker`)
and :func:`run_training` (the whole job: MLflow run, fit, model logging and registration), with
the run names, storage paths and resume checks they need."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pose2seg.config import Config
from workflows.coco_metrics import VAL_METRIC
from workflows.mlflow_buffer import is_unreachable
from workflows.train_finish import (
    TrackingUnavailableError,
    finish_tracking,
    prune_unregistered_checkpoints,
)
from workflows.train_input import steps_per_epoch
from workflows.train_validation import load_validation_data
from workflows.train_worker import train_loop_per_worker


@dataclass
class PreparedData:
    """The preprocessed splits and what the loop needs to know about them."""

    train: Any  # ray.data.Dataset
    val: Any  # ray.data.Dataset
    templates: np.ndarray
    num_train_images: int
    summary: Any = None
    train_files: list[tuple[str, int]] = field(default_factory=list)
    """Every training Parquet file with its row count (the per-epoch reader's manifest)."""


def prepare_data(config: Config, *, force: bool = False) -> PreparedData:
    """Generate (synthetic) and preprocess the dataset if needed; open both Parquet splits."""
    from ray.data import DataContext

    from preprocessing.epoch_reader import list_parquet, whole_split_dataset
    from preprocessing.pipeline import (
        READ_CPUS,
        load_split,
        load_templates,
        preprocess_dataset,
        processed_dir,
    )
    from workflows.console import configure_data_context

    # Datasets copy the current context when made: in a Tune trial's process too.
    configure_data_context(DataContext.get_current())
    summary = preprocess_dataset(config, force=force)

    # Listed once per run: every epoch's per-rank file slices are cut from this manifest.
    # First: reading every footer names a truncated shard (Ray Data's reader would not).
    train_files = list_parquet(processed_dir(config, "train"))
    train = load_split(config, "train")
    # The val split is read by every worker every epoch: materialise it once in the object
    # store instead of re-running its read tasks (which also compete for CPUs) each time.
    # Read from a file list (no Ray Data Parquet listing: its footer-reader actors are each a
    # new worker process).
    val = whole_split_dataset(
        processed_dir(config, "val"),
        read_cpus=READ_CPUS,
        concurrency=2,
        runtime_env=_runtime_env(),
    ).materialize()
    templates = load_templates(config)
    return PreparedData(
        train=train,
        val=val,
        templates=templates.astype(np.float32),
        num_train_images=sum(n for _, n in train_files),
        summary=summary,
        train_files=train_files,
    )


def build_trainer(
    config: Config,
    data: PreparedData,
    *,
    run_name: str,
    mlflow: Any,  # mlflow_tracking.RunHandle of the job's run, or None
    callbacks: list | None = None,
    resume_plan: dict[str, Any] | None = None,
):
    """A ``TorchTrainer`` for the config: scaling, storage, failure handling, checkpoints.
    ``resume_plan``: :class:`workflows.train_failures.ResumePlan` as a dict, when a resumed
    run must restore from an older checkpoint than its newest (unreadable) one."""
    import ray
    import ray.train
    from ray.data import DataContext
    from ray.train.torch import TorchTrainer

    from workflows.cli import debug_enabled
    from workflows.console import train_logging_config
    from workflows.train_failures import (
        FailFastOnDataErrors,
        placement_retry_limit,
        start_timeout_s,
    )

    quiet = not debug_enabled(None)  # --debug / POSE2SEG_DEBUG=1: Ray's INFO lines shown

    loop_config = {
        # Plain picklable objects: the typed config and the (T,K,2) float32 templates.
        "config": config,
        "templates": np.asarray(data.templates, dtype=np.float32),
        "steps_per_epoch": steps_per_epoch(config, data.num_train_images),
        "num_train_images": int(data.num_train_images),
        "train_files": [[u, int(n)] for u, n in data.train_files],
        "read_runtime_env": _runtime_env(),
        # Validation scores against the val annotation file as evaluate.py reads it: read
        # once here and handed to the workers through the object store (a list, so Ray passes
        # the reference instead of resolving it into the config).
        "val_data": [ray.put(load_validation_data(config))],
        "mlflow": mlflow,
        "resume_plan": resume_plan,
        "quiet_ray": quiet,
    }
    from workflows.cluster_checks import worker_resources

    resources = worker_resources(config)
    elastic = (
        {
            "num_workers": (config.train.min_workers, config.train.max_workers),
            "elastic_resize_monitor_interval_s": config.train.elastic_resize_interval_s,
        }
        if config.train.elastic
        else {"num_workers": config.train.max_workers}
    )
    scaling = ray.train.ScalingConfig(
        use_gpu=config.train.use_gpu,
        resources_per_worker=resources,
        placement_strategy=config.train.placement_strategy,
        **elastic,
    )
    run_config = ray.train.RunConfig(
        name=run_name,
        storage_path=_storage_path(config.train.storage_path),
        storage_filesystem=_storage_filesystem(config.train.storage_path),
        failure_config=ray.train.FailureConfig(
            max_failures=config.train.max_failures,
            # Bounded: a worker group that cannot be placed fails the run after
            # train.placement_timeout_s (Ray Train alone retries for ever).
            controller_failure_limit=placement_retry_limit(
                config.train.placement_timeout_s, start_timeout_s(config)
            ),
        ),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=config.train.num_to_keep,
            checkpoint_score_attribute=VAL_METRIC,
            checkpoint_score_order="max",
        ),
        # A corrupt shard or checkpoint fails the same way on every retry: fail at once.
        callbacks=[*(callbacks or []), FailFastOnDataErrors()],
        logging_config=train_logging_config(quiet=quiet),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
        # Training input is read per epoch and per rank (iter_train_batches); only the
        # materialised val split goes through Ray Train, whole to every worker.
        datasets={"val": data.val},
        # The execution options given (the current context's, what Ray Train would copy):
        # Ray Train's own copy sets a deprecated field and warns in its DatasetManager.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[], execution_options=DataContext.get_current().execution_options
        ),
    )


def _runtime_env() -> dict[str, Any] | None:
    from preprocessing.pipeline import _runtime_env as read_env

    return read_env()


def _storage_path(path: str) -> str:
    if "://" in path:
        from preprocessing.storage import pyarrow_filesystem

        _, stripped = pyarrow_filesystem(path)
        return stripped
    return os.path.abspath(path)


def _storage_filesystem(path: str):
    if "://" in path:
        from preprocessing.storage import pyarrow_filesystem

        fs, _ = pyarrow_filesystem(path)
        return fs
    return None


def new_run_name(prefix: str = "pose2seg") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass
class TrainOutcome:
    """What a training job produced (printed by train.py, asserted by tests)."""

    run_name: str
    mlflow_run_id: str | None
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    checkpoint_path: str | None
    model_uri: str | None = None
    registration: Any = None
    tracking_uri: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def best_checkpoint(result):
    """The best checkpoint by val AP, falling back to the last one."""
    best = None
    try:
        best = result.get_best_checkpoint(VAL_METRIC, "max")
    except Exception:  # pragma: no cover - older result objects
        best = None
    return best or result.checkpoint


def fit_interruptibly(trainer):
    """``trainer.fit()``, with Ctrl-C (and SIGTERM turned into KeyboardInterrupt by the command)
    left to the job: in the main thread, ``fit`` runs in a helper thread while the main thread
    waits, so a KeyboardInterrupt reaches the caller at once. Ray Train's own SIGINT handler
    (installed only from the main thread) asks its controller to abort and waits for it, which
    never ends while the worker group cannot be placed ("worker group startup timed out"), and
    then returns as if training had ended. The controller is an actor owned by this process:
    it goes when the process exits."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()  # a Tune trial's driver: signals never reach this thread
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="pose2seg-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class RunNotFoundError(FileNotFoundError):
    """``--resume NAME`` names no run under ``train.storage_path`` (exit code 2)."""


def existing_runs(config: Config) -> list[str]:
    """Names of the runs (and Tune searches) under ``train.storage_path``."""
    from preprocessing.storage import list_dirs

    return list_dirs(_storage_uri(config.train.storage_path))


def _storage_uri(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def check_resumable(config: Config, name: str) -> None:
    """Raise :class:`RunNotFoundError` (one line listing the runs there) unless a run named
    ``name`` exists under ``train.storage_path``."""
    runs = existing_runs(config)
    if name in runs:
        return
    where = _storage_uri(config.train.storage_path)
    shown = ", ".join(runs[-20:]) if runs else "none"
    more = f" (last 20 of {len(runs)})" if len(runs) > 20 else ""
    raise RunNotFoundError(
        f"cannot resume {name!r}: no run of that name under train.storage_path={where}; "
        f"runs there{more}: {shown}"
    )


def plan_resume(config: Config, name: str) -> dict[str, Any] | None:
    """Check the run's checkpoints newest first; when the newest is unreadable, say so in one
    line and return the plan to restore from the newest readable one (else None)."""
    from dataclasses import asdict

    from preprocessing.storage import join
    from workflows.train_failures import choose_resume_checkpoint

    plan = choose_resume_checkpoint(join(_storage_uri(config.train.storage_path), name))
    if not plan.use:
        if plan.skip:
            print(
                f"[pose2seg] no checkpoint folder of {name} reads ({plan.reasons[0]}); Ray "
                "Train resumes from the checkpoint it registered, if any",
                flush=True,
            )
        return None
    print(
        f"[pose2seg] {plan.reasons[0]}; resuming from {plan.use}, the newest readable "
        f"checkpoint ({len(plan.skip)} newer one(s) skipped)",
        flush=True,
    )
    return asdict(plan)


def check_new_run_name(config: Config, name: str) -> None:
    """A new run must not reuse a stored run's name: Ray Train would silently continue it."""
    if name in existing_runs(config):
        raise FileExistsError(
            f"a run named {name!r} already exists under train.storage_path="
            f"{_storage_uri(config.train.storage_path)}; continue it with --resume {name} "
            "or choose another train.run_name"
        )


def run_training(
    config: Config,
    *,
    resume: str | None = None,
    register: bool | None = None,
    parent_run_id: str | None = None,
) -> TrainOutcome:
    """The whole training job on an already-initialised Ray: data, MLflow run, fit, model
    logging and registration.

    ``resume``: the name of a run under ``train.storage_path`` to continue from its last
    checkpoint (:class:`RunNotFoundError` at once when there is none); its MLflow run (found by
    the ``pose2seg.run_name`` tag) is reopened, so a job has one run and one metric history.
    Without ``resume``, a ``train.run_name`` that already exists is an error (FileExistsError).
    An interrupted fit ends the MLflow run (KILLED / FAILED) before the error propagates; a
    run whose driver was killed outright is ended by the next job on the host
    (:func:`workflows.mlflow_tracking.end_orphaned_runs`) or continued by ``--resume``."""
    from workflows import mlflow_tracking as tracking

    run_name = resume or config.train.run_name or new_run_name()
    resume_plan = None
    if resume:
        check_resumable(config, resume)
        resume_plan = plan_resume(config, resume)
    else:
        check_new_run_name(config, run_name)
    from workflows.cluster_checks import check_cluster

    check_cluster(config)  # before any work: a request no node can hold, a local path
    for run_id in tracking.end_orphaned_runs(config):
        print(f"[pose2seg] ended MLflow run {run_id}: its driver process is gone", flush=True)
    data = prepare_data(config)
    tags = {
        "pose2seg.kind": "train",
        "pose2seg.preprocess_key": config.preprocess_key(),
        "pose2seg.resumed": str(bool(resume)),
    }
    handle = None
    if resume:
        handle = tracking.continue_run(
            config, run_name=run_name, extra_filter="tags.`pose2seg.kind` = 'train'", tags=tags
        )
        if handle is not None:
            print(f"[pose2seg] continuing MLflow run {handle.run_id} of {run_name}", flush=True)
        else:
            print(
                f"[pose2seg] no MLflow run of {run_name} in this tracking store: starting one",
                flush=True,
            )
    if handle is None:
        handle = tracking.start_run(
            config, run_name=run_name, parent_run_id=parent_run_id, tags=tags
        )
    print(
        f"[pose2seg] MLflow run {handle.run_id} in {tracking.redact_uri(handle.tracking_uri)}",
        flush=True,
    )
    trainer = build_trainer(
        config,
        data,
        run_name=run_name,
        mlflow=handle,
        resume_plan=resume_plan,
    )
    try:
        from workflows.train_failures import placement_attempt

        with placement_attempt(config):
            result = fit_interruptibly(trainer)
    except BaseException as exc:
        # Never leave the run RUNNING: KILLED for an interruption (Ctrl-C, SIGTERM from
        # `ray job stop`), FAILED for an error. `--resume` reopens it.
        interrupted = isinstance(exc, KeyboardInterrupt | SystemExit)
        try:
            tracking.end_run(handle, status="KILLED" if interrupted else "FAILED")
        except Exception as end_exc:
            if not is_unreachable(end_exc):
                raise
            print(
                f"[pose2seg] warning: could not mark MLflow run {handle.run_id} "
                f"{'KILLED' if interrupted else 'FAILED'}: the tracking server does not answer",
                flush=True,
            )
        print(
            f"[pose2seg] run {run_name} {'interrupted' if interrupted else 'failed'}; "
            f"continue it with --resume {run_name}",
            flush=True,
        )
        from workflows.train_failures import placement_error

        not_placed = placement_error(exc, config, run_name)
        if not_placed is not None:
            raise not_placed from exc
        raise
    for path in prune_unregistered_checkpoints(result):
        print(f"[pose2seg] removed {path}: a checkpoint its failed attempt never registered")
    ckpt = best_checkpoint(result)
    returned = (
        (getattr(result, "return_value", None) or {}) if hasattr(result, "return_value") else {}
    )
    outcome = TrainOutcome(
        run_name=run_name,
        mlflow_run_id=handle.run_id,
        metrics=dict(result.metrics or {}),
        history=returned.get("history", []),
        checkpoint_path=ckpt.path if ckpt else None,
        tracking_uri=handle.tracking_uri,
        extra={"placement": returned.get("placement", [])},
    )
    try:
        finish_tracking(
            config, handle, outcome, ckpt, result.checkpoint, returned, register=register
        )
    except Exception as exc:
        if not is_unreachable(exc):
            raise
        raise TrackingUnavailableError(
            f"training of {run_name} finished and its checkpoints are stored, but the MLflow "
            f"tracking server {tracking.redact_uri(handle.tracking_uri)} does not answer "
            f"({type(exc).__name__}), so its metrics are incomplete and the model is not "
            f"registered; best checkpoint: {outcome.checkpoint_path}; when the server is back, "
            f"`python workflows/train.py --resume {run_name}` delivers the metrics and registers it"
        ) from exc
    return outcome
