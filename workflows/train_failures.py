"""Training failures that a retry cannot fix, and the checkpoint a resume may fall back to.

Ray Train restarts the worker group after any worker error, up to ``train.max_failures``
times. That is right for a lost node or a killed process, and wrong for a data error: a
corrupt Parquet shard or an unreadable checkpoint fails the same way on every attempt (three
restarts, a minute of work, and then an error that names no file). :class:`FailFastOnDataErrors`
runs in Ray Train's controller and ends the run at the first such error, which then reaches
the command as its own one-line message (exit code 2).

A run whose Train workers cannot be placed (a lost node not replaced, resources another job
or a stopped trial still holds) waits at most ``train.placement_timeout_s``:
:func:`placement_retry_limit` turns it into Ray Train's limit on start-up retries (by default
it retries for ever), and :func:`placement_error` turns Ray Train's give-up into one line that
says what was asked and what the cluster has (:class:`WorkersNotPlacedError`, exit code 2).

``--resume`` of a run whose newest checkpoint is unreadable (a truncated ``training.pt``, a
copy cut short): :func:`choose_resume_checkpoint`, in the driver, checks the run's checkpoints
newest first and names the newest readable one; the workers then restore from it instead of the
one Ray Train would hand them (:func:`resume_checkpoint`), and the driver says so in one line.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray.train

# Errors of the data, not of the run: retrying reads the same bytes again. By qualified class
# name, so that the callback below does not import torch into Ray Train's controller.
NON_RETRIED = (
    "preprocessing.epoch_reader.UnreadableParquetError",
    "pose2seg.checkpoint.CheckpointError",
)


def _is_non_retried(exc: BaseException) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" in NON_RETRIED for c in type(exc).__mro__)


def data_error(exc: BaseException) -> BaseException | None:
    """The :data:`NON_RETRIED` error inside a Train worker's failure, or None.

    Ray Train hands the controller the worker's exception wrapped with its traceback
    (``UserExceptionWithTraceback``, the original in ``_base_exc``); ``__cause__`` chains are
    followed too."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if _is_non_retried(cur):
            return cur
        todo += [getattr(cur, "_base_exc", None), getattr(cur, "cause", None), cur.__cause__]
    return None


class FailFastOnDataErrors(ray.train.UserCallback):
    """Ends the run, without a retry, when a worker failed on a :data:`NON_RETRIED` error.

    Raising ``ControllerError`` from the controller's poll is what makes Ray Train's failure
    policy raise instead of restarting the worker group (it retries every worker-group error,
    and of controller errors only start-up failures); ``fit()`` then raises it with the data
    error as its ``controller_failure``, which ``workflows.cli`` shows as one line."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank in sorted(worker_exceptions):
            found = data_error(worker_exceptions[rank])
            if found is not None:
                raise ray.train.ControllerError(found)


# Ray Train's own setting: how long one attempt to place the worker group waits (seconds).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 60.0


def start_timeout_s(config: Any = None) -> float:
    """Seconds one placement attempt of Ray Train waits: ``train.placement_attempt_s`` when
    set, else Ray Train's env setting, read as it reads it."""
    if config is not None and config.train.placement_attempt_s > 0:
        return float(config.train.placement_attempt_s)
    try:
        return float(os.environ.get(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S))
    except ValueError:
        return DEFAULT_START_TIMEOUT_S


@contextlib.contextmanager
def placement_attempt(config: Any) -> Iterator[None]:
    """Around ``fit()``: ``train.placement_attempt_s`` (when set) as Ray Train's own variable,
    which Ray Train hands from the driver's environment to the run's controller when ``fit``
    starts it; the driver's environment is as it was afterwards."""
    seconds = config.train.placement_attempt_s
    if seconds <= 0:
        yield
        return
    before = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = f"{seconds:g}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = before


def placement_retry_limit(placement_timeout_s: float, attempt_s: float | None = None) -> int:
    """``FailureConfig(controller_failure_limit=...)`` for ``train.placement_timeout_s``: the
    placement attempts after the first, so that all of them together last about the timeout
    (-1, no limit, for 0). ``attempt_s``: one attempt (default: Ray Train's setting). Ray Train
    counts them over the whole run."""
    if placement_timeout_s <= 0:
        return -1
    return max(0, math.ceil(placement_timeout_s / (attempt_s or start_timeout_s())) - 1)


class WorkersNotPlacedError(TimeoutError):
    """The run's Train workers were not placed within ``train.placement_timeout_s``."""


def _placement_gave_up(exc: BaseException) -> bool:
    """``fit()`` raised Ray Train's ``ControllerError`` for a worker group that never started
    (by class name: no import of Ray Train's internals)."""
    failure = getattr(exc, "controller_failure", None)
    return failure is not None and type(failure).__name__ == "WorkerGroupStartupTimeoutError"


def placement_error(exc: BaseException, config: Any, run_name: str) -> WorkersNotPlacedError | None:
    """The one-line error for ``exc`` when it is Ray Train giving up on placing the workers
    of ``run_name`` (else None): what the run asked for, for how long, what the cluster has."""
    if not _placement_gave_up(exc):
        return None
    import ray

    from workflows.cluster_checks import cluster_nodes, describe, describe_cluster, worker_resources

    attempt_s = start_timeout_s(config)
    attempts = placement_retry_limit(config.train.placement_timeout_s, attempt_s) + 1
    workers = config.train.min_workers if config.train.elastic else config.train.max_workers
    try:
        # Placement groups' own resources (CPU_group_<id>, bundle_group_<id>) are not what a
        # user can ask for: only the plain ones are shown.
        available = {k: v for k, v in ray.available_resources().items() if "_group_" not in k}
        nodes, free = describe_cluster(cluster_nodes()), describe(available)
    except Exception:  # pragma: no cover - the cluster itself is gone
        nodes, free = "(unknown: the cluster does not answer)", "unknown"
    return WorkersNotPlacedError(
        f"{run_name}: its {workers} Train worker{'s' if workers != 1 else ''} x "
        f"({describe(worker_resources(config))}) could not be placed in "
        f"{attempts * attempt_s:.0f} s (train.placement_timeout_s="
        f"{config.train.placement_timeout_s:g}; {attempts} attempt{'s' if attempts != 1 else ''}"
        f" of {attempt_s:.0f} s): the cluster has {nodes}; free now: {free}"
    )


@dataclass
class ResumePlan:
    """Where a resumed run restores from when its newest checkpoint is unreadable."""

    use: str | None = None  # the newest readable checkpoint (local folder or s3:// URI)
    skip: list[str] = field(default_factory=list)  # folder names of unreadable newer ones
    reasons: list[str] = field(default_factory=list)


def _checkpoint_names(run_uri: str) -> list[str]:
    from preprocessing.storage import list_dirs

    # Ray Train names them checkpoint_<timestamp>: name order is age order.
    return sorted((n for n in list_dirs(run_uri) if n.startswith("checkpoint_")), reverse=True)


def check_checkpoint(uri: str) -> None:
    """Read a stored checkpoint (with its training state) as a resume would; raises
    :class:`CheckpointError` naming the unreadable file."""
    from pose2seg.checkpoint import CheckpointError, load_checkpoint
    from preprocessing.storage import download_dir, is_remote

    if not is_remote(uri):
        load_checkpoint(uri, with_training_state=True)
        return
    with tempfile.TemporaryDirectory(prefix="pose2seg-ckpt-check-") as local:
        download_dir(uri, local)
        try:
            load_checkpoint(local, with_training_state=True)
        except CheckpointError as exc:
            raise CheckpointError(str(exc).replace(local, uri)) from None


def choose_resume_checkpoint(run_uri: str) -> ResumePlan:
    """The checkpoint ``--resume`` restores from: ``ResumePlan()`` when the newest one reads
    (Ray Train's own choice stands, nothing is replaced), else the newest readable one and the
    unreadable ones skipped. When none reads, ``use`` stays None and Ray Train's choice stands:
    a folder a killed worker left half-written was never registered (the run restarts from
    its last registered checkpoint, or from scratch), and a registered unreadable one fails the
    worker that loads it, naming the file, without a retry."""
    from pose2seg.checkpoint import CheckpointError
    from preprocessing.storage import join

    plan = ResumePlan()
    for name in _checkpoint_names(run_uri):
        uri = join(run_uri, name)
        try:
            check_checkpoint(uri)
        except CheckpointError as exc:
            plan.skip.append(name)
            plan.reasons.append(str(exc))
            continue
        if plan.skip:
            plan.use = uri
        return plan
    return plan


def resume_checkpoint(plan: dict[str, Any] | None):
    """In a Train worker: Ray Train's checkpoint to restore from, or the driver's fallback
    (``plan``: :class:`ResumePlan` as a dict) when Ray Train hands out one found unreadable."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None or not plan or not plan.get("use"):
        return checkpoint
    if os.path.basename(checkpoint.path.rstrip("/")) not in plan["skip"]:
        return checkpoint  # a newer checkpoint of this job (a worker restart after it)
    from preprocessing.storage import is_remote, pyarrow_filesystem

    if is_remote(plan["use"]):
        fs, path = pyarrow_filesystem(plan["use"])
        return ray.train.Checkpoint(path=path, filesystem=fs)
    return ray.train.Checkpoint.from_directory(plan["use"])
