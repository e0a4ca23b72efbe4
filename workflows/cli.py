"""What every entry script shares: config arguments, Ray start-up, a readable error exit.

Exit codes of every command (``preprocess``, ``train``, ``tune``, ``evaluate``, ``predict``,
``serve``): 0 success; 2 an expected user error (a bad config, a missing file or data root, an
unreachable endpoint, an unknown model or alias, a bad keypoint file, too many rejected
records), printed as ONE line on stderr; 1 an unexpected error (a bug), printed with its
traceback; 130 interrupted. ``--debug`` or ``POSE2SEG_DEBUG=1`` shows the traceback of expected
errors too. Errors raised inside Ray tasks, actors, Ray Data UDFs or Ray Train workers are
unwrapped to their root cause first, so the user reads their own message, not Ray's wrapper.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from collections.abc import Callable

from pose2seg.config import Config, ConfigError, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="experiment YAML (configs/*.yaml); defaults: configs/default.yaml values"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one dotted config key, e.g. --set train.epochs=3 (repeatable)",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: $RAY_ADDRESS inside `ray job submit`, else a new local instance)",
    )
    add_debug_arg(parser)


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the full traceback of errors (same as {DEBUG_ENV}=1)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    dashboard: bool = True,
    log_to_driver: bool = True,
    progress_bars: bool = True,
    runtime_env: dict | None = None,
) -> None:
    """The one way to start Ray (commands, benchmarks, test fixtures): connect to a cluster
    (``--address`` / ``$RAY_ADDRESS``) or start a local instance; does nothing when Ray is up.

    ``num_cpus``, ``dashboard`` and ``runtime_env`` apply to a new local instance only (benchmarks
    and tests start a private one without the dashboard); ``progress_bars=False`` silences
    Ray Data's progress bars. Ray's INFO lines go to its session log folder, not the console
    (``workflows/console.py``), unless ``--debug`` / ``POSE2SEG_DEBUG=1``; one line says
    where that folder is."""
    import ray

    from workflows.console import configure_data_context, prepare_driver

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        quiet = not debug_enabled(None)
        if not quiet:  # --debug: a local instance's processes (Tune trials) see it too
            os.environ.setdefault(DEBUG_ENV, "1")
        if address:
            # Inside `ray job submit` RAY_ADDRESS is set; resources come from the cluster.
            extra = prepare_driver(quiet=quiet, local=False)
            info = ray.init(address=address, log_to_driver=log_to_driver, **extra)
        else:
            _quiet_token_auth_notice()
            extra = prepare_driver(quiet=quiet, local=True)
            # The dashboard (ray[default]) also serves the State API that Ray Train's controller
            # polls; without it Train prints "Failed to query Ray Train Controller actor state".
            if not dashboard:
                extra["include_dashboard"] = False
            info = ray.init(
                num_cpus=num_cpus,
                log_to_driver=log_to_driver,
                runtime_env=with_cluster_address(runtime_env),
                **extra,
            )
        print(_ray_started_line(info, address), flush=True)
    from ray.data import DataContext  # after prepare_driver: Ray Data reads its logging then

    context = DataContext.get_current()
    # A failing Ray Data UDF then raises the user's exception (inside RayTaskError, whose
    # ``cause`` keeps it) instead of a bare "UDF failed to process a data block".
    context.raise_original_map_exception = True
    configure_data_context(context)
    if not progress_bars:
        context.enable_progress_bars = False


def _ray_started_line(info, address: str | None) -> str:
    """One line for Ray's start: what it is, its CPUs, the dashboard, where its logs are."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    what = (
        f"connected to the Ray cluster at {address}" if address else "started a local Ray instance"
    )
    details = [f"{cpus:g} CPUs"]
    dashboard_url = getattr(info, "dashboard_url", None)
    if dashboard_url:
        url = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
        details.append(f"dashboard {url}")
    session = (getattr(info, "address_info", None) or {}).get("session_dir")
    logs = f"; Ray's own log lines: {os.path.join(session, 'logs')}" if session else ""
    return f"[pose2seg] {what} ({', '.join(details)}){logs}"


def with_cluster_address(runtime_env: dict | None) -> dict:
    """``runtime_env`` plus a worker setup hook (:func:`set_cluster_address`) that tells every
    worker process of the new local instance which Ray cluster it belongs to."""
    env = dict(runtime_env or {})
    env.setdefault("worker_process_setup_hook", set_cluster_address)
    return env


def set_cluster_address() -> None:
    """In a Ray worker process: ``RAY_ADDRESS`` = the GCS address of the worker's own cluster.

    Ray's State API (``ray.util.state``), called without an address, otherwise looks for a Ray
    instance on the machine: Ray Train's placement-group cleaner (a detached actor started for
    every fit, which polls the controller's state) then finds two GCS processes when a second
    local instance runs beside ours (another command, a notebook, a test session) and dies
    with a 30-line "Found multiple active Ray instances" traceback on the console (and stops
    watching the controller). With the address set it asks its own cluster."""
    import ray

    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:  # a raising setup hook would stop every worker: without it, Ray's default
        return
    os.environ["RAY_ADDRESS"] = address


_TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"


class _DropTokenAuthNotice:
    """A logging filter: Ray 2.59+ logs, as a WARNING before every command's first line, that
    the new local instance uses token authentication (its secure default, nothing to do).
    Only that notice is dropped; every other record of the logger (the warning that
    authentication is *disabled*, errors) still reaches the console."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(_TOKEN_NOTICE)


def _quiet_token_auth_notice() -> None:
    import logging

    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenAuthNotice) for f in logger.filters):
        logger.addFilter(_DropTokenAuthNotice())


class UserError(Exception):
    """An expected error a command raises for the user to fix (exit code 2, one line)."""


DEBUG_ENV = "POSE2SEG_DEBUG"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def debug_enabled(argv: list[str] | None) -> bool:
    """``--debug`` among the arguments, or ``POSE2SEG_DEBUG`` set to a true value."""
    if "--debug" in (argv if argv is not None else sys.argv[1:]):
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def root_cause(exc: BaseException) -> BaseException:
    """The user's own exception inside Ray's wrappers.

    Follows ``RayTaskError.cause`` (tasks and actors), the ``__cause__`` of Ray Data's
    ``UserCodeException`` ("UDF failed to process a data block") and of other ``ray.*``
    wrappers, and Ray Train's ``WorkerGroupError.worker_failures`` (lowest rank first) /
    ``ControllerError.controller_failure``. Our own exceptions are never unwrapped: their
    message is the one meant for the user even when they chain a lower-level cause.
    """
    seen: set[int] = set()
    traceback_text = ""
    while id(exc) not in seen:
        seen.add(id(exc))
        if _is_ray_class(type(exc)) and not traceback_text:
            # The outermost RayTaskError keeps the remote traceback in ``traceback_str``; its
            # dual ``RayTaskError(Cause)`` form only in its message.
            traceback_text = getattr(exc, "traceback_str", None) or str(exc)
        inner: BaseException | None = None
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            inner = failures[sorted(failures)[0]]
        elif isinstance(getattr(exc, "controller_failure", None), BaseException):
            inner = exc.controller_failure
        elif _is_ray_wrapper(exc):
            cause = getattr(exc, "cause", None)
            inner = cause if isinstance(cause, BaseException) else exc.__cause__
        if inner is None or inner is exc:
            break
        exc = inner
    if _is_ray_class(type(exc)) and traceback_text:
        # Ray Data's "UDF failed to process a data block" crossed a process boundary, which
        # drops ``__cause__``: the user's exception survives only in the remote traceback.
        recovered = _exception_from_traceback(traceback_text)
        if recovered is not None:
            return recovered
    return exc


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit)): (.*)$")


def _exception_from_traceback(text: str) -> BaseException | None:
    """The last ``Name: message`` line of a remote traceback that is not Ray's own, rebuilt as
    that built-in exception type when it is one (else None)."""
    import builtins

    for line in reversed(text.splitlines()):
        match = _EXCEPTION_LINE.match(line.strip())
        if not match:
            continue
        name, message = match.groups()
        if name.startswith("ray.") or name in ("UserCodeException", "RayTaskError"):
            continue
        cls = getattr(builtins, name.rsplit(".", 1)[-1], None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                return cls(message)
            except Exception:  # pragma: no cover - an exception type with odd arguments
                return None
        if name.split(".")[0] in _OWN_PACKAGES:
            return UserError(message)  # e.g. preprocessing.pipeline.PreprocessError
        return None
    return None


# Packages whose exceptions, met in a remote traceback, are taken as expected errors.
_OWN_PACKAGES = ("pose2seg", "preprocessing", "workflows", "mlflow", "botocore")


def _is_ray_class(cls: type) -> bool:
    return any((c.__module__ or "").startswith("ray.") for c in cls.__mro__)


def _is_ray_wrapper(exc: BaseException) -> bool:
    # ``RayTaskError(ValueError)`` is a dynamic subclass of both: test the MRO for ray.*.
    return _is_ray_class(type(exc)) and (
        getattr(exc, "cause", None) is not None or exc.__cause__ is not None
    )


def _expected_types() -> tuple[type, ...]:
    """Exception types that mean "the user must fix an input", not "a bug"."""
    # OSError: missing files and folders, refused connections; ValueError: bad input files.
    types: list[type] = [ConfigError, ValueError, OSError, UserError]
    try:
        from preprocessing.pipeline import PreprocessError

        types.append(PreprocessError)
    except ImportError:  # pragma: no cover - preprocessing is part of the repository
        pass
    try:
        from mlflow.exceptions import MlflowException

        types.append(MlflowException)
    except ImportError:  # pragma: no cover
        pass
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        types.extend([BotoCoreError, ClientError])
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def one_line(exc: BaseException, *, limit: int = 600) -> str:
    """``exc``'s message on one line: ``MlflowException.message`` when it has one, lines
    joined with " | ", at most ``limit`` characters."""
    text = getattr(exc, "message", None)
    if not isinstance(text, str) or not text:
        text = str(exc)
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    text = " | ".join(lines) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_line(exc: BaseException) -> str:
    """``error: <message>`` (``configuration error:`` for a bad config)."""
    if isinstance(exc, ConfigError):
        return f"configuration error: {one_line(exc)}"
    name = type(exc).__name__
    prefix = "" if name in ("UserError", "ValueError", "OSError") else f"{name}: "
    return f"error: {prefix}{one_line(exc)}"


def run_main(fn: Callable[[list[str] | None], int | None], argv: list[str] | None) -> int:
    """Run an entry point: expected user errors (also inside Ray) become one line on stderr
    and exit code 2; ``--debug`` / ``POSE2SEG_DEBUG=1`` re-raises them with the traceback."""
    try:
        return int(fn(argv) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except BaseException as exc:
        from preprocessing.storage import explain_s3_error

        # pyarrow's S3 errors (Ray Data's Parquet reads and writes) name the operation and the
        # key, not the endpoint: the line names both, as for boto3 calls.
        cause = explain_s3_error(root_cause(exc))
        if debug_enabled(argv) or not isinstance(cause, _expected_types()):
            raise
        print(error_line(cause), file=sys.stderr)
        return EXIT_USER_ERROR


def command(fn: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Decorator for a command's ``main(argv)``: the same error handling as :func:`run_main`,
    also when tests or other code call ``main`` directly."""

    @functools.wraps(fn)
    def wrapper(argv: list[str] | None = None) -> int:
        return run_main(fn, argv)

    return wrapper


def resolve_model_and_connect(model_arg: str | None, config: Config, address: str | None) -> str:
    """The model reference (default: the config's registered model and alias), with Ray
    started and MLflow pointed at the config's tracking store."""
    model_ref = model_arg or f"models:/{config.registry.model_name}@{config.registry.alias}"
    init_ray(address)
    from workflows.mlflow_tracking import client_for, resolve_tracking_uri

    client_for(resolve_tracking_uri(config))
    return model_ref
