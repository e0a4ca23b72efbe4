"""What reaches the user's console besides the project's own lines: Ray's, Ray Data's and Ray
Train's INFO records go to Ray's session log folder only; their warnings and errors, and
everything the project prints, still reach the console; MLflow's known cautions of our model
logging are said once in the docs instead of at every run.

Ray's own switches first, run in the process they concern:

- the job's process (:func:`prepare_driver`, called by ``workflows.cli.init_ray`` before Ray
  starts): ``ray.init(logging_level=WARNING)`` for the driver's ``ray`` logger; Ray Data's
  ``RAY_DATA_LOGGING_CONFIG`` (``ray_data_logging.yaml``: its default configuration with the
  console at WARNING), inherited by every process of a local instance; a local instance's Ray
  Train preemption watcher off (one machine is never preempted; the actor is one more process
  and its start logs a C++ ``E`` line that is no error).
- wherever datasets are made (:func:`configure_data_context`): Ray Data reports progress through
  its logger (into ``ray-data.log``) instead of ``tqdm_ray``, whose lines reached the console
  as empty lines from every Train worker.
- Ray Train (:func:`train_logging_config`): ``LoggingConfig(log_level="WARNING")`` filters the
  ``ray.train`` loggers on the console of the controller and the workers; Ray Train's system
  log files keep every level.
- each Ray Train worker and each Tune trial driver (:func:`quiet_train_worker`): Ray Data's
  logging as in the driver (also on a cluster whose workers did not inherit the variable),
  boto's credential notice at WARNING, and :class:`DropRayInfo` on the console handler of the
  root logger, which Ray Train sets to INFO in its workers and which
  carries records of Ray's modules that are not named ``ray.train`` ("Reporting training result
  ..."). The root logger's file handler (``logs/train/ray-train-app-worker-*.log``) keeps them.

``--debug`` or ``POSE2SEG_DEBUG=1`` leaves all of Ray's switches at their defaults (the caller
passes ``quiet=False``). Runs in the driver and in Ray workers; imports no project module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator

RAY_DATA_LOGGING_FILE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "ray_data_logging.yaml"
)
RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"  # Ray Data's own variable: a YAML path
RAY_DATA_ENCODING_ENV = "RAY_DATA_LOG_ENCODING"  # Ray Data's own; with it we leave Ray Data be
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train's own


class DropRayInfo(logging.Filter):
    """A console handler's filter: drops records below WARNING that come from Ray's own
    modules (a logger named ``ray`` / ``ray.*``, or a record made in a file under Ray's
    package folder: Ray Train names one logger by its file path). Records of WARNING and
    above always pass, and so does everything else: the project's lines, also ``print`` calls
    that Ray Train turns into root-logger records (their path is the caller's file)."""

    def __init__(self, ray_package_dir: str | None = None) -> None:
        super().__init__()
        if ray_package_dir is None:
            import ray

            ray_package_dir = os.path.dirname(os.path.abspath(ray.__file__))
        self._prefixes = tuple(
            {os.path.join(d, "") for d in (ray_package_dir, os.path.realpath(ray_package_dir))}
        )

    def is_ray(self, record: logging.LogRecord) -> bool:
        name = record.name or ""
        return (
            name == "ray"
            or name.startswith("ray.")
            or name.startswith(self._prefixes)
            or (record.pathname or "").startswith(self._prefixes)
        )

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not self.is_ray(record)


def prepare_driver(*, quiet: bool, local: bool) -> dict:
    """Before ``ray.init`` in the job's process: set what Ray's processes read at start and
    return the extra ``ray.init`` arguments. ``local``: a new local instance is started (its
    processes inherit this environment)."""
    if not quiet:
        return {}
    _use_quiet_ray_data_logging()
    if local:
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    return {"logging_level": logging.WARNING}


def configure_data_context(context) -> None:
    """Ray Data's progress as log records (``ray-data.log``; on the console with ``--debug``)
    in every process, not ``tqdm_ray``: without ``tqdm`` installed it printed empty lines and
    "tqdm is not installed" from every Train worker's validation. Datasets copy the context
    when they are made, and Ray Train hands the driver's to its workers: set it first."""
    context.use_ray_tqdm = False


def train_logging_config(*, quiet: bool):
    """Ray Train's ``RunConfig(logging_config=...)``: its own INFO lines (resources requested,
    worker group started, process group, device, "Checkpoint successfully created") off the
    console of the controller and the workers, kept in its system log files."""
    import ray.train

    return ray.train.LoggingConfig(log_level="WARNING" if quiet else "INFO")


def quiet_train_worker(*, quiet: bool) -> None:
    """At the start of a Ray Train worker's loop (after Ray Train configured its loggers) and
    of a Tune trial driver."""
    if not quiet:
        return
    _use_quiet_ray_data_logging()
    # Ray Train sets the root logger of its workers to INFO, so boto3's "Found credentials in
    # environment variables." reached the console once per worker and S3 client.
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
    ray_filter = DropRayInfo()
    for handler in logging.getLogger().handlers:
        if _is_console(handler) and not any(isinstance(f, DropRayInfo) for f in handler.filters):
            handler.addFilter(ray_filter)


def _is_console(handler: logging.Handler) -> bool:
    # Ray's console handler is a StreamHandler; its file handlers are not (they wrap one).
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


def _use_quiet_ray_data_logging() -> None:
    """Point Ray Data at ``ray_data_logging.yaml`` unless the user configured Ray Data's
    logging; a process that imported Ray Data already is reconfigured now (Ray Data reads the
    variable when it configures its logger: at import and when a task gets a new context)."""
    if os.environ.get(RAY_DATA_LOGGING_ENV) or os.environ.get(RAY_DATA_ENCODING_ENV):
        return
    if not os.path.isfile(RAY_DATA_LOGGING_FILE):  # pragma: no cover - an install without it
        return
    os.environ[RAY_DATA_LOGGING_ENV] = RAY_DATA_LOGGING_FILE
    if "ray.data" in sys.modules:
        from ray.data._internal.logging import configure_logging

        configure_logging()


# MLflow's cautions at every ``log_pose2seg_model``, known and answered in docs/TRAINING.md
# ("MLflow"): our pyfunc takes a DataFrame with no type hints and no input example (its
# signature is given), and both flavours are pickled on purpose (a variable number of people
# per image does not fit ``pt2``).
_KNOWN_MLFLOW_WARNINGS = tuple(
    re.compile(r"(\x1b\[[0-9;]*m)?" + re.escape(text))
    for text in (
        "Add type hints to the `predict` method",
        "An input example was not provided when logging the model",
    )
)
_KNOWN_MLFLOW_LOG_LINES = {
    "mlflow.pyfunc": "Passing a Python object as `python_model` causes it to be serialized",
    "mlflow.pytorch": "Saving pytorch model by Pickle or CloudPickle format requires exercising",
}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def known_mlflow_cautions_silenced() -> Iterator[None]:
    """Around our model logging only: drop MLflow's four known cautions (two ``UserWarning``
    texts, two log records matched by logger and text); every other warning and record of the
    call still reaches the console.

    The warnings are dropped where they are shown, not by a warnings filter: MLflow wraps the
    check that warns in its own ``simplefilter("once", UserWarning)``, which comes first."""
    filters = [(logging.getLogger(n), _DropMessage(p)) for n, p in _KNOWN_MLFLOW_LOG_LINES.items()]
    for logger, drop in filters:
        logger.addFilter(drop)
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and any(
            p.match(str(message)) for p in _KNOWN_MLFLOW_WARNINGS
        ):
            return
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    try:
        yield
    finally:
        warnings.showwarning = shown
        for logger, drop in filters:
            logger.removeFilter(drop)
