"""MLflow for the workflows: the tracking store, runs, params, metrics, models and the registry.

The default store is a local SQLite database (the model registry needs a database) with
artifacts in ``./mlartifacts``; on a cluster, ``registry.tracking_uri`` points at a tracking
server (``$MLFLOW_TRACKING_URI`` only when the config leaves it empty). All calls go through an explicit
``MlflowClient`` so Ray workers, Tune trials and the driver never fight over an "active run".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from pose2seg.config import Config
from workflows.coco_metrics import VAL_METRIC
from workflows.mlflow_buffer import MetricBuffer, bound_http_waits

RUN_NAME_TAG = "pose2seg.run_name"
"""The Ray Train run / Tune experiment name a run belongs to: how a resume finds its run."""
DRIVER_TAG = "pose2seg.driver"
"""``host:pid`` of the driver that holds a RUNNING run (to end runs whose driver died)."""
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, token usage);
with it, on "Training runs"."""
PYFUNC_CODE_PACKAGES = ("pose2seg", "preprocessing", "workflows")
"""The project's packages copied into a logged pyfunc model (its ``code_paths``): every one the
pyfunc imports, so that a model served where the project is not installed still loads and
answers (the image decoding and its error reasons come from ``preprocessing.schema``)."""
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"

# Never logged: anything that looks like a credential (a user may pass one through --set by
# mistake, and the environment holds them on a cluster).
_SECRET_MARKERS = ("secret", "password", "token", "access_key", "credential")
# The password of a URI's user info (``postgresql://user:PASSWORD@host/db``).
_URI_PASSWORD = re.compile(r"(://[^/@:\s]+:)[^/@\s]+@")


def redact_uri(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host``; other text unchanged."""
    return _URI_PASSWORD.sub(r"\1***@", text)


_WARNED_URIS: set[tuple[str, str]] = set()


def resolve_tracking_uri(config: Config) -> str:
    """The config's URI, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    ``registry.tracking_uri`` is the single source when set: a different
    ``$MLFLOW_TRACKING_URI`` is ignored, with a warning (once per pair) on stderr."""
    if config.registry.tracking_uri:
        env = os.environ.get("MLFLOW_TRACKING_URI", "")
        pair = (config.registry.tracking_uri, env)
        if env and env != config.registry.tracking_uri and pair not in _WARNED_URIS:
            import sys

            _WARNED_URIS.add(pair)
            print(
                f"[pose2seg] warning: MLFLOW_TRACKING_URI={redact_uri(env)} is ignored: "
                f"registry.tracking_uri={redact_uri(config.registry.tracking_uri)} is set",
                file=sys.stderr,
            )
        return config.registry.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{os.path.abspath(DEFAULT_DB)}"


def client_for(uri: str):
    import mlflow
    from mlflow import MlflowClient

    bound_http_waits()  # a dead tracking server fails a call in about 30 s, not 4-5 min
    # The pyfunc / registry helpers below use the fluent API's global tracking URI; the
    # registry follows it (setting a registry URI too would pin it for the whole process,
    # and a later set_tracking_uri elsewhere would then load models from the wrong registry).
    mlflow.set_tracking_uri(uri)
    with _sqlite_store_lock(uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        if uri.startswith("sqlite:///") and uri not in _READY_STORES:
            client.search_experiments(max_results=1)  # creates the tracking store's tables
            client.search_registered_models(max_results=1)  # and the registry's
            _READY_STORES.add(uri)
    return client


_READY_STORES: set[str] = set()


@contextlib.contextmanager
def _sqlite_store_lock(uri: str):
    """An exclusive file lock beside a SQLite store while this process first opens it. MLflow
    creates (migrates) the tables on first use, and two commands started at once on a new store
    both ran the migrations: both died (``table ... already exists``, "Online migration
    expected to match one row") with a traceback."""
    if not uri.startswith("sqlite:///") or uri in _READY_STORES:
        yield
        return
    import fcntl

    db_path = uri[len("sqlite:///") :]
    os.makedirs(os.path.dirname(os.path.abspath(db_path)), exist_ok=True)
    with open(f"{db_path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_client(handle: RunHandle):
    """An ``MlflowClient`` for the run's tracking store with bounded HTTP waits, in whatever
    process it runs: a Ray Train worker or a Tune trial makes MLflow calls (params, tags, the
    end of its run) that must not wait MLflow's default 4-5 minutes for a dead server."""
    from mlflow import MlflowClient

    bound_http_waits()
    return MlflowClient(tracking_uri=handle.tracking_uri)


def ensure_experiment(client, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if needed; tagged as a model-training experiment
    (:data:`EXPERIMENT_KIND_TAG`) whether it is new or reused."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        # A local store: keep artifacts beside the database, not in whatever cwd a worker has.
        db_path = uri.split(":///", 1)[-1] if uri.startswith("sqlite:") else uri
        base = os.path.dirname(os.path.abspath(db_path))
        artifact_location = os.path.join(base, DEFAULT_ARTIFACTS)
    return client.create_experiment(
        name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )


def param_value(value: Any) -> str:
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def loggable_params(flat: dict[str, Any]) -> dict[str, str]:
    """Flat config -> MLflow params, with anything credential-like masked."""
    out = {}
    for key, value in flat.items():
        text = redact_uri(param_value(value))
        if any(marker in key.lower() for marker in _SECRET_MARKERS):
            text = "***"
        out[key] = text[:6000]
    return out


@dataclass
class RunHandle:
    """Everything a Ray worker needs to log into one MLflow run (plain data, picklable)."""

    tracking_uri: str
    run_id: str
    experiment_id: str


def start_run(
    config: Config,
    *,
    run_name: str,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> RunHandle:
    """Create a run in the config's experiment and log every flattened config key as a param."""
    from mlflow.entities import Param

    uri = resolve_tracking_uri(config)
    client = client_for(uri)
    experiment_id = ensure_experiment(client, config.registry.experiment, uri)
    all_tags = {"mlflow.runName": run_name, RUN_NAME_TAG: run_name, DRIVER_TAG: _driver_id()}
    all_tags.update(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    params = [Param(k, v) for k, v in loggable_params(config.to_flat()).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return RunHandle(tracking_uri=uri, run_id=run.info.run_id, experiment_id=experiment_id)


def _driver_id() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def find_run(config: Config, *, run_name: str, extra_filter: str = "") -> Any | None:
    """The newest run of the config's experiment tagged with ``run_name`` (or, for runs made
    before the tag existed, named so), or None."""
    uri = resolve_tracking_uri(config)
    client = client_for(uri)
    exp = client.get_experiment_by_name(config.registry.experiment)
    if exp is None:
        return None
    quoted = run_name.replace("'", "\\'")
    more = f" and {extra_filter}" if extra_filter else ""
    for flt in (f"tags.`{RUN_NAME_TAG}` = '{quoted}'", f"attributes.run_name = '{quoted}'"):
        runs = client.search_runs(
            [exp.experiment_id], filter_string=flt + more, order_by=["attributes.start_time DESC"]
        )
        if runs:
            return runs[0]
    return None


def continue_run(
    config: Config, *, run_name: str, extra_filter: str = "", tags: dict[str, str] | None = None
) -> RunHandle | None:
    """Reopen the run of ``run_name`` (status back to RUNNING, whatever it was: FAILED or
    KILLED after an interruption, RUNNING after a killed driver, FINISHED when extended) so
    that a resumed job logs into the same run: one run, one metric history. None when the
    store holds no such run. Params are not logged again (MLflow params are immutable)."""
    run = find_run(config, run_name=run_name, extra_filter=extra_filter)
    if run is None:
        return None
    uri = resolve_tracking_uri(config)
    client = client_for(uri)
    run_id = run.info.run_id
    client.update_run(run_id, status="RUNNING")
    resumes = int(run.data.tags.get("pose2seg.resumes", "0") or 0) + 1
    for key, value in {
        "pose2seg.resumes": str(resumes),
        DRIVER_TAG: _driver_id(),
        **(tags or {}),
    }.items():
        client.set_tag(run_id, key, value)
    return RunHandle(tracking_uri=uri, run_id=run_id, experiment_id=run.info.experiment_id)


def end_orphaned_runs(config: Config) -> list[str]:
    """End (status KILLED) the RUNNING training runs whose driver was a process of this host that no
    longer exists (a SIGKILLed ``train.py``): they would otherwise stay RUNNING forever. A
    later ``--resume`` of the same name reopens the run and continues it. Returns their ids."""
    import socket

    uri = resolve_tracking_uri(config)
    client = client_for(uri)
    exp = client.get_experiment_by_name(config.registry.experiment)
    if exp is None:
        return []
    host = socket.gethostname()
    ended = []
    for run in client.search_runs(
        [exp.experiment_id],
        filter_string="attributes.status = 'RUNNING' and tags.`pose2seg.kind` = 'train'",
    ):
        driver = run.data.tags.get(DRIVER_TAG, "")
        run_host, _, pid = driver.rpartition(":")
        if run_host != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "pose2seg.ended_because", f"driver {driver} is gone")
        client.set_terminated(run.info.run_id, status="KILLED")
        ended.append(run.info.run_id)
    return ended


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_metrics(handle: RunHandle, metrics: dict[str, float], *, step: int) -> None:
    """Log finite numeric metrics at ``step`` (non-finite values are skipped: MLflow rejects NaN)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(key, float(value), now, step)
        for key, value in metrics.items()
        if isinstance(value, int | float) and math.isfinite(float(value))
    ]
    if batch:
        run_client(handle).log_batch(handle.run_id, metrics=batch)


def log_params(handle: RunHandle, params: dict[str, str]) -> None:
    """Log params the driver cannot know (what a worker resolved on its own hardware). A resumed
    run that resolves a different value keeps the first one and says so (MLflow params are
    immutable)."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    client = run_client(handle)
    logged = client.get_run(handle.run_id).data.params
    new = {k: str(v) for k, v in params.items() if k not in logged}
    for key in sorted(set(params) - set(new)):
        if logged[key] != str(params[key]):
            print(
                f"[pose2seg] MLflow param {key} stays {logged[key]!r} (this start: {params[key]!r})",
                flush=True,
            )
    if new:
        try:
            client.log_batch(handle.run_id, params=[Param(k, v) for k, v in new.items()])
        except MlflowException as exc:  # a concurrent writer logged it first
            print(f"[pose2seg] MLflow params not logged: {exc}", flush=True)


def set_tags(handle: RunHandle, tags: dict[str, str]) -> None:
    """Set (or overwrite) tags of the run."""
    client = run_client(handle)
    for key, value in tags.items():
        client.set_tag(handle.run_id, key, value)


REDONE_EPOCHS_TAG = "pose2seg.redone_epochs"


def note_redone_epochs(handle: RunHandle, epochs: list[int]) -> list[int]:
    """Add ``epochs`` to the run's tag ``pose2seg.redone_epochs`` (a JSON list): epochs trained
    again after a lost worker whose metrics in the run are the first, uncommitted attempt's
    (MLflow keeps one value a step); the checkpoint's history holds the committed ones. Merged
    with what an earlier rank 0 of the run noted. Returns the whole list."""
    client = run_client(handle)
    noted = json.loads(client.get_run(handle.run_id).data.tags.get(REDONE_EPOCHS_TAG, "[]"))
    merged = sorted({int(e) for e in noted} | {int(e) for e in epochs})
    client.set_tag(handle.run_id, REDONE_EPOCHS_TAG, json.dumps(merged))
    return merged


def metric_buffer(handle: RunHandle, **kwargs: Any) -> MetricBuffer:
    """Rank 0's buffered metric logger for the run (:class:`workflows.mlflow_buffer.MetricBuffer`)."""
    return MetricBuffer(handle, label=redact_uri(handle.tracking_uri), **kwargs)


def end_run(handle: RunHandle, status: str = "FINISHED") -> None:
    run_client(handle).set_terminated(handle.run_id, status=status)


def log_artifact_file(handle: RunHandle, path: str, artifact_path: str | None = None) -> None:
    run_client(handle).log_artifact(handle.run_id, path, artifact_path)


def log_pose2seg_model(handle: RunHandle, checkpoint_dir: str, *, name: str = "model") -> str:
    """Log a checkpoint as an MLflow model (pyfunc: image + keypoints -> RLE masks) and the
    bare network under ``pytorch`` (PyTorch flavour, pickled with the ``pose2seg`` code).

    Returns the pyfunc model URI (``runs:/<id>/<name>``).
    """
    import mlflow
    import mlflow.pytorch

    from pose2seg.arch import build_model
    from pose2seg.checkpoint import TRAINING_FILE, load_checkpoint
    from workflows.console import known_mlflow_cautions_silenced

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code_paths = [os.path.join(repo, package) for package in PYFUNC_CODE_PACKAGES]
    loaded = load_checkpoint(checkpoint_dir)
    client_for(handle.tracking_uri)
    serving = tempfile.mkdtemp(prefix="pose2seg-model-")
    serving_ckpt = os.path.join(serving, "checkpoint")
    # Serve the weights, config, templates and state; not the optimiser state (2x the model).
    shutil.copytree(checkpoint_dir, serving_ckpt, ignore=shutil.ignore_patterns(TRAINING_FILE))
    # MLflow's cautions about pickled models and a pyfunc without type hints are known and
    # answered once in docs/TRAINING.md, not at every run; any other warning still shows.
    # The pyfunc's module is imported inside: MLflow checks the type hints when the class is
    # defined.
    with mlflow.start_run(run_id=handle.run_id), known_mlflow_cautions_silenced():
        from workflows.pyfunc_model import Pose2SegPyfunc, pyfunc_signature

        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=Pose2SegPyfunc(),
            artifacts={"checkpoint": serving_ckpt},
            code_paths=code_paths,
            signature=pyfunc_signature(),
            pip_requirements=_pip_requirements(),
        )
        network = build_model(loaded.config.model)
        network.load_state_dict(loaded.model_state)
        network.eval()
        mlflow.pytorch.log_model(
            network,
            name="pytorch",
            serialization_format="pickle",
            code_paths=[os.path.join(repo, "pose2seg")],
            pip_requirements=_pip_requirements(),
        )
        with tempfile.TemporaryDirectory() as tmp:
            import numpy as np

            from pose2seg.checkpoint import TEMPLATES_FILE

            path = os.path.join(tmp, TEMPLATES_FILE)
            np.save(path, loaded.templates)
            mlflow.log_artifact(path, artifact_path="templates")
    shutil.rmtree(serving, ignore_errors=True)
    return info.model_uri


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [
        f"torch=={version('torch')}",
        f"torchvision=={version('torchvision')}",
        f"numpy=={version('numpy')}",
        f"pycocotools=={version('pycocotools')}",
        f"pillow=={version('pillow')}",
        f"mlflow=={version('mlflow')}",
    ]


@dataclass
class Registration:
    """The outcome of :func:`register_if_better`."""

    name: str
    version: str
    val_ap: float
    alias: str
    alias_moved: bool
    previous_version: str | None
    previous_ap: float | None


def register_if_better(
    config: Config, handle: RunHandle, model_uri: str, *, val_ap: float
) -> Registration:
    """Register ``model_uri`` as a new version and move the alias to it only if its val AP
    beats the current holder's (ties keep the holder)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = client_for(handle.tracking_uri)
    name, alias = config.registry.model_name, config.registry.alias
    mv = mlflow.register_model(
        model_uri, name, tags={VAL_METRIC: f"{val_ap:.6f}", "run_id": handle.run_id}
    )
    previous_version, previous_ap = None, None
    try:
        holder = client.get_model_version_by_alias(name, alias)
        previous_version = str(holder.version)
        previous_ap = float(holder.tags.get(VAL_METRIC, "nan"))
    except MlflowException:
        holder = None
    better = holder is None or not math.isfinite(previous_ap) or val_ap > previous_ap
    if better:
        client.set_registered_model_alias(name, alias, mv.version)
    return Registration(
        name=name,
        version=str(mv.version),
        val_ap=val_ap,
        alias=alias,
        alias_moved=better,
        previous_version=previous_version,
        previous_ap=previous_ap,
    )


def register_with_alias(
    handle: RunHandle, model_uri: str, *, name: str, alias: str, tags: dict[str, str]
) -> str:
    """Register ``model_uri`` as a new version of ``name`` and point ``alias`` at it whatever
    it held before (an import has no val AP to compare). Returns the version."""
    import mlflow

    client = client_for(handle.tracking_uri)
    mv = mlflow.register_model(model_uri, name, tags={**tags, "run_id": handle.run_id})
    client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)
