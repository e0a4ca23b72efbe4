"""Architecture ablations with Ray Tune over the same training loop as train.py.

    python workflows/tune.py                                 # small default search, synthetic data
    python workflows/tune.py --config configs/X.yaml --set 'tune.search_space={"model.roi_size": [32, 64]}'
    python workflows/tune.py --config configs/X.yaml --set tune.name=NAME   # resumes NAME if it exists
    python workflows/tune.py --config configs/X.yaml --resume NAME          # NAME must exist

Each trial is a Ray Train run (``workflows.train_driver.build_trainer``) driven from a Tune trial,
reported to Tune per epoch (ASHA stops weak trials on val AP), logged as an MLflow child run of
one parent run. At the end: an ablation table (markdown + CSV) and a plot, logged to MLflow and
written to ``eval.output_dir``, and the best trial's model registered (alias moved only if it
beats the holder).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pose2seg.config import PREPROCESS_KEYS, PREPROCESS_KEYS_IF_SET, Config  # noqa: E402
from workflows.ablation_report import write_ablation_report  # noqa: E402
from workflows.cli import (  # noqa: E402
    add_config_args,
    command,
    config_from_args,
    debug_enabled,
    init_ray,
)
from workflows.coco_metrics import VAL_METRIC  # noqa: E402
from workflows.mlflow_buffer import is_unreachable  # noqa: E402


def trial_config(base: Config, overrides: dict[str, Any]) -> Config:
    return base.with_overrides(overrides)


def preprocessing_variants(base: Config) -> list[Config]:
    """One config per distinct combination of the searched keys that change the Parquet."""
    if base.tune.trials:
        # Named trials: every trial's config, once per distinct Parquet variant.
        variants: dict[str, Config] = {}
        for overrides in base.tune.trials.values():
            cfg = base.with_overrides(overrides)
            variants.setdefault(cfg.preprocess_key(), cfg)
        return list(variants.values())
    space = base.tune.search_space
    keys = [k for k in space if k in PREPROCESS_KEYS or k in PREPROCESS_KEYS_IF_SET]
    variants = []
    for values in itertools.product(*(space[k] for k in keys)):
        variants.append(base.with_overrides(dict(zip(keys, values, strict=True))))
    return variants or [base]


TRIAL_PARAM = "__trial"
"""Tune parameter naming the trial of ``tune.trials`` (its overrides come from the config)."""


def trial_overrides(base: Config, params: dict[str, Any]) -> dict[str, Any]:
    """The config overrides of a trial: its grid values, or its named trial's overrides."""
    overrides = {k: v for k, v in params.items() if not k.startswith("__")}
    if params.get(TRIAL_PARAM) is not None:
        overrides.update(base.tune.trials[params[TRIAL_PARAM]])
    return overrides


def trial_driver(params: dict[str, Any], search: dict[str, Any]) -> None:
    """One Tune trial: a whole Ray Train run with the trial's overrides (runs in a Tune actor).

    ``params``: the trial's own parameters (what Tune prints and stores per trial); ``search``:
    what every trial shares (the base config, the MLflow parent run, the search's name, whether
    Ray's INFO lines stay off the console), given once through ``tune.with_parameters``."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from workflows import mlflow_tracking as tracking
    from workflows.console import quiet_train_worker
    from workflows.train_driver import build_trainer, prepare_data
    from workflows.train_finish import finish_trial_run

    quiet_train_worker(quiet=search["quiet"])  # Ray Data's INFO lines of this trial's datasets
    base = Config.from_flat(search["base"])
    overrides = trial_overrides(base, params)
    trial_id = ray.tune.get_context().get_trial_id()
    run_name = f"{search['experiment']}-{trial_id}"
    # No in-trial retries: a diverging trial (NaN) fails the same way every time, and Tune
    # reports a failed trial and carries on with the search.
    config = base.with_overrides({**overrides, "train.run_name": run_name, "train.max_failures": 0})
    data = prepare_data(config)  # already preprocessed by the driver: this only opens the Parquet
    # A trial restored with its search continues its own MLflow run (one per trial).
    handle = tracking.continue_run(
        config,
        run_name=run_name,
        extra_filter=f"tags.mlflow.parentRunId = '{search['parent_run_id']}'",
    ) or tracking.start_run(
        config,
        run_name=run_name,
        parent_run_id=search["parent_run_id"],
        tags={
            "pose2seg.trial_id": trial_id,
            "pose2seg.overrides": json.dumps(overrides, sort_keys=True),
            # The named trial (tune.trials) this run is, if any.
            **({"pose2seg.variant": params[TRIAL_PARAM]} if params.get(TRIAL_PARAM) else {}),
        },
    )
    trainer = build_trainer(
        config,
        data,
        run_name=run_name,
        mlflow=handle,
        callbacks=[TuneReportCallback()],
    )
    # No end_run on an exception here: when Tune stops a trial (ASHA, or at max_t) fit() may
    # raise too; the driver ends every run from the trial's final status (_close_trial_runs).
    from workflows.train_failures import placement_attempt

    try:
        with placement_attempt(config):
            result = trainer.fit()
    except Exception as exc:
        from workflows.train_failures import placement_error

        not_placed = placement_error(exc, config, run_name)
        if not_placed is not None:  # one line in the search's "failed trial" list
            raise not_placed from None
        raise
    # A tracking server gone by now costs one warning, not the trial: Tune has its results.
    finish_trial_run(handle, result, run_name=run_name)


@dataclass
class TuneOutcome:
    """What a search produced (printed by main, asserted by tests)."""

    experiment_path: str
    parent_run_id: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    report_dir: str
    registration: Any = None
    model_uri: str | None = None
    errors: list[str] = field(default_factory=list)
    tracking_error: str | None = None
    """Set when the MLflow tracking server stopped answering before the search's final
    logging: the one line ``tune.py`` ends with (exit code 2)."""


def _storage(config: Config) -> tuple[str, Any]:
    from workflows.train_driver import _storage_filesystem, _storage_path

    return _storage_path(config.train.storage_path), _storage_filesystem(config.train.storage_path)


class SearchNotFoundError(FileNotFoundError):
    """``tune.py --resume NAME`` names no restorable search (exit code 2)."""


def check_restorable(config: Config, name: str) -> None:
    """Raise :class:`SearchNotFoundError` (one line listing what is there) unless the search
    ``name`` can be restored from ``train.storage_path``."""
    from ray import tune

    from preprocessing.storage import list_dirs

    storage_path, storage_fs = _storage(config)
    path = os.path.join(storage_path, name) if storage_fs is None else f"{storage_path}/{name}"
    if tune.Tuner.can_restore(path, storage_filesystem=storage_fs):
        return
    where = config.train.storage_path
    runs = list_dirs(where if "://" in where else os.path.abspath(where))
    raise SearchNotFoundError(
        f"cannot resume search {name!r}: no restorable Tune experiment at {path}; "
        f"folders under train.storage_path: {', '.join(runs[-20:]) or 'none'}"
    )


def run_tune(
    config: Config, *, register: bool | None = None, resume: str | None = None
) -> TuneOutcome:
    """Run (or resume) the search described by ``config.tune`` on an initialised Ray.

    ``resume``: a search name that must exist (:class:`SearchNotFoundError` at once if not);
    a ``tune.name`` that exists is restored too. A restored search continues its MLflow
    parent run (found by the ``pose2seg.run_name`` tag) and each restored trial its own run."""
    if resume:
        check_restorable(config, resume)
        config = config.with_overrides({"tune.name": resume})
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pose2seg.arch import build_model
    from pose2seg.model import count_parameters
    from workflows import mlflow_tracking as tracking
    from workflows.cluster_checks import check_cluster, state_api_reachable
    from workflows.train_driver import new_run_name, prepare_data

    for variant in preprocessing_variants(config):
        # A trial no node can hold would wait forever: refuse before any work.
        check_cluster(
            variant,
            driver_cpus=config.tune.cpus_per_trial_driver,
            driver_resources=config.tune.driver_resources,
            what="a tune trial",
        )
    if not state_api_reachable():
        print(
            "[pose2seg] warning: this Ray cluster's state API (its dashboard) does not answer, "
            "so Ray Train cannot free the workers of a trial whose driver is gone (stopped by "
            "ASHA, lost with its node) until the search ends; start the head with its dashboard "
            "(the default of `ray start --head`)",
            flush=True,
        )
    for variant in preprocessing_variants(config):
        prepare_data(variant)  # preprocess each data variant once, before trials race for it

    name = config.tune.name or new_run_name("pose2seg-tune")
    storage_path, storage_fs = _storage(config)
    experiment_path = (
        os.path.join(storage_path, name) if storage_fs is None else f"{storage_path}/{name}"
    )
    restoring = tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_fs)
    parent = None
    if restoring:
        parent = tracking.continue_run(
            config, run_name=name, extra_filter="tags.`pose2seg.kind` = 'tune'"
        )
    if parent is None:
        parent = tracking.start_run(config, run_name=name, tags={"pose2seg.kind": "tune"})
    print(f"[pose2seg] tune experiment {name}; MLflow parent run {parent.run_id}", flush=True)

    # What every trial shares goes through the object store, not the trials' parameters: Tune
    # prints each trial's parameters when it starts (the whole flat config was 200 lines a trial).
    search = {
        "base": config.to_flat(),
        "parent_run_id": parent.run_id,
        "experiment": name,
        "quiet": not debug_enabled(None),
    }
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, search=search),
        {"CPU": config.tune.cpus_per_trial_driver, **config.tune.driver_resources},
    )
    if config.tune.trials:
        param_space: dict[str, Any] = {TRIAL_PARAM: tune.grid_search(list(config.tune.trials))}
        report_keys = ["variant"]
    else:
        param_space = {
            key: tune.grid_search(values) for key, values in config.tune.search_space.items()
        }
        report_keys = list(config.tune.search_space)
    if restoring:
        print(f"[pose2seg] resuming the search at {experiment_path}", flush=True)
        tuner = tune.Tuner.restore(
            experiment_path,
            trainable,
            resume_errored=False,
            param_space=param_space,
            storage_filesystem=storage_fs,
        )
    else:
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=config.train.epochs,
            grace_period=min(config.tune.grace_period, config.train.epochs),
            reduction_factor=config.tune.reduction_factor,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=VAL_METRIC,
                mode="max",
                scheduler=scheduler,
                num_samples=config.tune.num_samples,
                max_concurrent_trials=config.tune.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                # A trial restarted after a failure (its node lost) rebuilds its Train run under
                # the same name, which Ray Train continues from the last checkpoint.
                failure_config=tune.FailureConfig(max_failures=config.tune.max_failures),
            ),
        )
    t0 = time.time()
    grid = tuner.fit()
    print(f"[pose2seg] search finished in {time.time() - t0:.0f} s", flush=True)

    rows, errors = [], []
    for result in grid:
        params = _trial_params(result)
        overrides = trial_overrides(config, params)
        cfg = config.with_overrides(overrides)
        df = result.metrics_dataframe
        best_ap = (
            float(df[VAL_METRIC].max()) if df is not None and VAL_METRIC in df else float("nan")
        )
        best_idx = (
            int(df[VAL_METRIC].idxmax())
            if df is not None and VAL_METRIC in df and df[VAL_METRIC].notna().any()
            else None
        )
        epochs = int(df["epoch"].max()) if df is not None and "epoch" in df else 0
        row = {
            "trial": os.path.basename(result.path),
            **{k: overrides.get(k) for k in config.tune.search_space if not config.tune.trials},
            **({"variant": params.get(TRIAL_PARAM)} if config.tune.trials else {}),
            # STOPPED: fewer epochs than its schedule without an error (ASHA stopped it).
            "status": "ERROR"
            if result.error
            else ("STOPPED" if epochs < cfg.train.epochs else "OK"),
            "epochs": epochs,
            VAL_METRIC: best_ap,
            "val_occluded_segm_ap": float(df.loc[best_idx, "val_occluded_segm_ap"])
            if best_idx is not None
            else float("nan"),
            "train_seconds": float(df["epoch_seconds"].sum())
            if df is not None and "epoch_seconds" in df
            else float("nan"),
            "parameters": count_parameters(build_model(cfg.model)),
            "checkpoint_path": str(df.loc[best_idx, "checkpoint_path"])
            if best_idx is not None and "checkpoint_path" in df
            else "",
        }
        if result.error:
            errors.append(f"{row['trial']}: {root_cause(result.error)}")
        rows.append(row)
    tracking_error: BaseException | None = None
    try:
        statuses = {row["trial"]: row["status"] for row in rows}
        _close_trial_runs(parent, grid, statuses, storage_fs)
    except Exception as exc:
        if not is_unreachable(exc):
            raise
        tracking_error = exc  # the report is still written; nothing more is sent to MLflow

    report_dir = os.path.join(config.eval.output_dir, name)
    write_ablation_report(rows, report_keys, report_dir)
    ok = [r for r in rows if r["status"] != "ERROR" and r[VAL_METRIC] == r[VAL_METRIC]]
    best = max(ok, key=lambda r: r[VAL_METRIC]) if ok else None
    outcome = TuneOutcome(
        experiment_path=experiment_path,
        parent_run_id=parent.run_id,
        rows=rows,
        best=best,
        report_dir=report_dir,
        errors=errors,
    )
    try:
        if tracking_error is None:
            _log_search(config, parent, outcome, storage_fs, register)
    except Exception as exc:
        if not is_unreachable(exc):
            raise
        tracking_error = exc
    if tracking_error is not None:
        outcome.tracking_error = _tracking_error_line(name, parent, outcome, tracking_error)
    return outcome


def _log_search(config: Config, parent, outcome: TuneOutcome, storage_fs, register) -> None:
    """The search's final logging into its parent run: the report, the best trial's AP and
    model (registered unless told not to), then the run ended."""
    from workflows import mlflow_tracking as tracking

    for fname in os.listdir(outcome.report_dir):
        tracking.log_artifact_file(parent, os.path.join(outcome.report_dir, fname), "ablation")
    best = outcome.best
    if best is not None:
        tracking.log_metrics(parent, {"best_val_segm_ap": best[VAL_METRIC]}, step=0)
        outcome.model_uri, outcome.registration = _log_best(
            config, parent, best, storage_fs, register
        )
    tracking.end_run(parent)


def _tracking_error_line(name: str, parent, outcome: TuneOutcome, exc: BaseException) -> str:
    from workflows.mlflow_tracking import redact_uri

    best = outcome.best["checkpoint_path"] if outcome.best else "none (no trial succeeded)"
    return (
        f"search {name} finished and its report is in {outcome.report_dir}, but the MLflow "
        f"tracking server {redact_uri(parent.tracking_uri)} does not answer "
        f"({type(exc).__name__}), so its parent run lacks the report and the best model is "
        f"not registered; best checkpoint: {best}; when the server is back, "
        f"`python workflows/tune.py --resume {name}` logs and registers them"
    )


def _log_best(config: Config, parent, best: dict[str, Any], storage_fs, register: bool | None):
    import ray.train

    from workflows import mlflow_tracking as tracking

    if not best["checkpoint_path"]:
        return None, None
    ckpt = ray.train.Checkpoint(best["checkpoint_path"], filesystem=storage_fs)
    with ckpt.as_directory() as ckpt_dir:
        model_uri = tracking.log_pose2seg_model(parent, ckpt_dir)
    registration = None
    if config.registry.register if register is None else register:
        registration = tracking.register_if_better(
            config, parent, model_uri, val_ap=best[VAL_METRIC]
        )
    return model_uri, registration


def _trial_params(result) -> dict[str, Any]:
    """A trial's parameters; a restored errored trial has no ``config``, read its params.json."""
    if result.config:
        return dict(result.config)
    try:
        fs = getattr(result, "filesystem", None)
        if fs is not None:
            with fs.open_input_stream(f"{result.path}/params.json") as fh:
                return json.loads(fh.read())
        with open(os.path.join(result.path, "params.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _last_checkpoint(result, storage_fs):
    """The newest checkpoint a trial reported (its ``checkpoint_path`` metric), or None."""
    import ray.train

    df = result.metrics_dataframe
    if df is None or "checkpoint_path" not in df:
        return None
    paths = [p for p in df["checkpoint_path"].tolist() if isinstance(p, str) and p]
    return ray.train.Checkpoint(paths[-1], filesystem=storage_fs) if paths else None


TRIAL_END_TAG = "pose2seg.trial_end"
"""Tag of a trial's MLflow child run: ``completed``, ``stopped`` (by ASHA, before its last
epoch) or ``failed``."""


def _close_trial_runs(parent, grid, statuses: dict[str, str], storage_fs=None) -> None:
    """Tag every trial's MLflow run with how the trial ended (``statuses``: ablation status by
    trial folder name) and end the runs their driver could not: ASHA stops a trial by ending
    its actor, so the code after ``fit()`` never runs; a tracking server that was down when a
    trial finished left its run RUNNING, short of the epochs rank 0 could not deliver. Those are
    delivered first, from the trial's last checkpoint (its history of every epoch)."""
    from mlflow import MlflowClient

    from workflows.mlflow_buffer import backfill_epoch_metrics
    from workflows.mlflow_tracking import RunHandle
    from workflows.train_finish import _checkpoint_history

    client = MlflowClient(tracking_uri=parent.tracking_uri)
    children = client.search_runs(
        [parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'"
    )
    ends = {"ERROR": "failed", "STOPPED": "stopped", "OK": "completed"}
    for run in children:
        trial_id = run.data.tags.get("pose2seg.trial_id", "")
        status = next((st for name, st in statuses.items() if trial_id and trial_id in name), None)
        if status is not None:
            client.set_tag(run.info.run_id, TRIAL_END_TAG, ends[status])
        if run.info.status != "RUNNING":
            continue
        result = next((r for r in grid if trial_id and trial_id in os.path.basename(r.path)), None)
        checkpoint = _last_checkpoint(result, storage_fs) if result is not None else None
        if checkpoint is not None:
            try:
                history = _checkpoint_history(checkpoint)
            except Exception as exc:  # a checkpoint that does not read has nothing to deliver
                print(
                    f"[pose2seg] trial {trial_id}: no epochs delivered from {checkpoint.path}: {exc}"
                )
                history = []
            handle = RunHandle(parent.tracking_uri, run.info.run_id, parent.experiment_id)
            backfill_epoch_metrics(handle, history)
        failed = (result is not None and bool(result.error)) or status == "ERROR"
        client.set_terminated(run.info.run_id, status="FAILED" if failed else "FINISHED")


def root_cause(error: BaseException) -> str:
    """The innermost ``SomeError: message`` line of a (Ray-wrapped) trial error."""
    import re

    lines = [ln.strip() for ln in str(error).splitlines()]
    causes = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", ln)]
    return (causes[-1] if causes else f"{type(error).__name__}: {lines[0] if lines else ''}")[:300]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument("--no-register", action="store_true", help="do not register the best model")
    parser.add_argument(
        "--resume", metavar="NAME", help="restore this stored search (it must exist)"
    )
    return parser


def default_search_overrides() -> dict[str, Any]:
    """The no-argument search: 4 trials of a short schedule, sized for a 2-core machine."""
    return {
        # Leave one whole CPU to Ray Data (its file-listing task asks for 1 CPU): trial driver
        # 0.25 + 2 workers x 0.25 on a 2-core machine.
        "train.cpus_per_worker": 0.25,
        "tune.cpus_per_trial_driver": 0.25,
        # A smaller training set than train.py's default (1440 images), in its own folder so
        # the two defaults do not regenerate each other's data: 4 trials fit in ~12 minutes.
        "data.root": "data/synthetic-search",
        "data.synthetic_num_train": 480,
        "train.epochs": 4,
        "tune.grace_period": 2,
        "tune.search_space": {
            "model.skeleton_features": ["both", "none"],
            "model.alignment": ["pose", "box"],
        },
    }


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    if not args.config and not args.overrides:
        config = config.with_overrides(default_search_overrides())
    if args.resume:
        check_restorable(config, args.resume)  # fail at once, before Ray starts
    init_ray(args.address)
    outcome = run_tune(config, register=False if args.no_register else None, resume=args.resume)
    print()
    with open(os.path.join(outcome.report_dir, "ablation.md")) as fh:
        print(fh.read())
    for err in outcome.errors:
        print(f"failed trial: {err}")
    if outcome.best:
        print(f"best trial {outcome.best['trial']}: val AP {outcome.best['val_segm_ap']:.4f}")
    reg = outcome.registration
    if reg is not None:
        state = "moved to it" if reg.alias_moved else f"kept on version {reg.previous_version}"
        print(f"registered {reg.name} version {reg.version}; alias @{reg.alias} {state}")
    print(f"report: {outcome.report_dir}   MLflow parent run: {outcome.parent_run_id}")
    if outcome.tracking_error:
        from workflows.train_finish import TrackingUnavailableError

        raise TrackingUnavailableError(outcome.tracking_error)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
