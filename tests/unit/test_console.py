"""workflows/console.py: which records reach the console (no Ray instance needed)."""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import pytest
import yaml

from workflows import console

RAY_DIR = "/venv/lib/python3.11/site-packages/ray"


def _record(name: str, level: int, pathname: str, msg: str = "a message") -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, msg, None, None)


@pytest.fixture
def drop():
    return console.DropRayInfo(RAY_DIR)


def test_a_ray_info_record_is_dropped(drop):
    storage = f"{RAY_DIR}/train/v2/_internal/execution/storage.py"
    assert not drop.filter(
        _record("ray.train.v2._internal.execution.storage", logging.INFO, storage)
    )
    # Ray Train's "Reporting training result" logger is named by its file's path.
    context = f"{RAY_DIR}/train/v2/_internal/execution/context.py"
    assert not drop.filter(_record(context, logging.INFO, context))
    # A print() inside Ray's own code, made a root record by Ray Train: its path is Ray's.
    assert not drop.filter(_record("root", logging.INFO, f"{RAY_DIR}/data/_internal/x.py"))
    assert not drop.filter(_record("ray", logging.DEBUG, "/elsewhere/y.py"))


def test_ray_warnings_and_errors_are_kept(drop):
    path = f"{RAY_DIR}/data/_internal/progress/__init__.py"
    for level in (logging.WARNING, logging.ERROR, logging.CRITICAL):
        assert drop.filter(_record("ray.data._internal.progress", level, path))


def test_our_lines_are_kept(drop):
    # Ray Train turns a worker's print() into a root INFO record made at the caller's line.
    ours = str(Path(console.__file__))
    assert drop.filter(_record("root", logging.INFO, ours, "[pose2seg] epoch 1/2  loss 0.5"))
    assert drop.filter(_record("workflows.train_worker", logging.INFO, ours))
    # A package whose name merely starts with "ray" is not Ray.
    assert drop.filter(_record("rayleigh", logging.INFO, "/venv/lib/rayleigh/__init__.py"))


def test_the_filter_on_a_real_handler_keeps_a_print_made_through_the_root_logger():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(console.DropRayInfo(RAY_DIR))
    logger = logging.getLogger("ray.train.test_console")
    root = logging.getLogger()
    saved = root.level
    logger.addHandler(handler)
    logger.propagate = False
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        logger.info("Checkpoint successfully created at: somewhere")
        logger.warning("a real Ray warning")
        root.info("[pose2seg] our print, through Train's patched print")
    finally:
        root.removeHandler(handler)
        root.setLevel(saved)
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines == ["a real Ray warning", "[pose2seg] our print, through Train's patched print"]


def test_quiet_train_worker_filters_console_handlers_only(monkeypatch):
    monkeypatch.setenv(console.RAY_DATA_LOGGING_ENV, "/already/set.yaml")  # Ray Data left be
    root = logging.getLogger()
    console_handler = logging.StreamHandler(io.StringIO())
    file_handler = logging.FileHandler(os.devnull)
    root.addHandler(console_handler)
    root.addHandler(file_handler)
    try:
        console.quiet_train_worker(quiet=True)
        console.quiet_train_worker(quiet=True)  # twice: one filter
        assert [type(f) for f in console_handler.filters] == [console.DropRayInfo]
        assert file_handler.filters == []  # the worker's log file keeps every record
    finally:
        root.removeHandler(console_handler)
        root.removeHandler(file_handler)
        file_handler.close()
    assert os.environ[console.RAY_DATA_LOGGING_ENV] == "/already/set.yaml"


def test_debug_leaves_ray_at_its_defaults(monkeypatch):
    monkeypatch.delenv(console.RAY_DATA_LOGGING_ENV, raising=False)
    monkeypatch.delenv(console.PREEMPTION_WATCHER_ENV, raising=False)
    assert console.prepare_driver(quiet=False, local=True) == {}
    assert console.RAY_DATA_LOGGING_ENV not in os.environ
    assert console.PREEMPTION_WATCHER_ENV not in os.environ


def test_quiet_driver_sets_rays_own_switches(monkeypatch):
    monkeypatch.delenv(console.RAY_DATA_LOGGING_ENV, raising=False)
    monkeypatch.delenv(console.RAY_DATA_ENCODING_ENV, raising=False)
    monkeypatch.delenv(console.PREEMPTION_WATCHER_ENV, raising=False)
    assert console.prepare_driver(quiet=True, local=False) == {"logging_level": logging.WARNING}
    assert os.environ[console.RAY_DATA_LOGGING_ENV] == console.RAY_DATA_LOGGING_FILE
    assert console.PREEMPTION_WATCHER_ENV not in os.environ  # a cluster's nodes can be preempted
    console.prepare_driver(quiet=True, local=True)
    assert os.environ[console.PREEMPTION_WATCHER_ENV] == "0"


def test_ray_data_logging_is_rays_default_with_the_console_at_warning():
    from ray.data._internal.logging import DEFAULT_CONFIG

    ours = yaml.safe_load(Path(console.RAY_DATA_LOGGING_FILE).read_text())
    assert ours["handlers"]["console"]["level"] == "WARNING"
    ours["handlers"]["console"]["level"] = DEFAULT_CONFIG["handlers"]["console"]["level"]
    assert ours == DEFAULT_CONFIG  # a Ray upgrade that changes its default fails here


def test_known_mlflow_cautions_are_silenced_and_nothing_else():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    mlflow_logger = logging.getLogger("mlflow")
    mlflow_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with console.known_mlflow_cautions_silenced():
                # MLflow wraps the check that warns in its own "once" filter, which comes first.
                warnings.simplefilter("once", category=UserWarning)
                warnings.warn(
                    "\x1b[33mAdd type hints to the `predict` method to enable data validation",
                    UserWarning,
                    stacklevel=1,
                )
                warnings.warn(
                    "\x1b[1;33mAn input example was not provided when logging the model.",
                    UserWarning,
                    stacklevel=1,
                )
                warnings.warn("some other MLflow warning", UserWarning, stacklevel=1)
                logging.getLogger("mlflow.pyfunc").warning(
                    "Passing a Python object as `python_model` causes it to be serialized ..."
                )
                logging.getLogger("mlflow.pytorch").warning(
                    "Saving pytorch model by Pickle or CloudPickle format requires exercising ..."
                )
                logging.getLogger("mlflow.pyfunc").warning("another pyfunc warning")
            logging.getLogger("mlflow.pytorch").warning(
                "Saving pytorch model by Pickle or CloudPickle format requires exercising (after)"
            )
    finally:
        mlflow_logger.removeHandler(handler)
    assert [str(w.message) for w in caught] == ["some other MLflow warning"]
    assert stream.getvalue().splitlines() == [
        "another pyfunc warning",
        "Saving pytorch model by Pickle or CloudPickle format requires exercising (after)",
    ]


def test_quiet_train_worker_keeps_botos_credential_notice_off_the_console(monkeypatch):
    monkeypatch.setenv(console.RAY_DATA_LOGGING_ENV, "/already/set.yaml")
    credentials, root = logging.getLogger("botocore.credentials"), logging.getLogger()
    saved = credentials.level, root.level
    try:
        credentials.setLevel(logging.NOTSET)
        root.setLevel(logging.INFO)  # as Ray Train sets it in its workers
        assert credentials.isEnabledFor(logging.INFO)
        console.quiet_train_worker(quiet=True)
        assert not credentials.isEnabledFor(logging.INFO)
        assert credentials.isEnabledFor(logging.WARNING)
    finally:
        credentials.setLevel(saved[0])
        root.setLevel(saved[1])
