"""tune.py on a real local Ray: 2 trials over the shared training loop, one of which diverges
(NaN loss); MLflow parent/child runs, the ablation report and the registered best model."""

from __future__ import annotations

import csv
import os

import pytest

from tests.helpers import tiny_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def searched(ray_session, tmp_path_factory):
    from workflows.tune import run_tune

    tmp_path = tmp_path_factory.mktemp("tune")
    config = tiny_config(
        tmp_path,
        **{
            "train.epochs": 2,
            "train.num_workers": 1,
            # Leave a whole CPU to Ray Data on the 2-CPU test cluster (its file listing asks
            # for 1 CPU) while the previous trial's resources are being released.
            "train.cpus_per_worker": 0.25,
            "tune.cpus_per_trial_driver": 0.25,
            "train.optimizer": "sgd",
            "train.grad_clip_norm": 0.0,
            "tune.search_space": {"train.lr": [0.01, 1e30]},
            "tune.grace_period": 1,
            "tune.name": "tune-test",
            "eval.output_dir": str(tmp_path / "outputs"),
            "registry.model_name": "pose2seg-tune-test",
        },
    )
    return config, run_tune(config)


def test_diverging_trial_fails_without_killing_the_search(searched):
    _, outcome = searched
    by_lr = {row["train.lr"]: row for row in outcome.rows}
    assert set(by_lr) == {0.01, 1e30}
    assert by_lr[1e30]["status"] == "ERROR"
    assert any("FloatingPointError" in e or "non-finite" in e for e in outcome.errors), (
        outcome.errors
    )
    assert by_lr[0.01]["status"] == "OK"
    assert by_lr[0.01]["epochs"] == 2
    assert outcome.best is not None and outcome.best["train.lr"] == 0.01


def test_ablation_report_files(searched):
    _, outcome = searched
    for name in ("ablation.csv", "ablation.md", "ablation.png"):
        assert os.path.getsize(os.path.join(outcome.report_dir, name)) > 0
    with open(os.path.join(outcome.report_dir, "ablation.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    assert all(int(r["parameters"]) > 0 for r in rows)


def test_mlflow_parent_child_runs_and_registered_best(searched):
    from mlflow import MlflowClient

    config, outcome = searched
    client = MlflowClient(tracking_uri=config.registry.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'",
    )
    statuses = sorted(run.info.status for run in children)
    assert statuses == ["FAILED", "FINISHED"]
    assert all("train.lr" in run.data.params for run in children)
    reg = outcome.registration
    assert reg is not None and reg.alias_moved
    version = client.get_model_version_by_alias(config.registry.model_name, config.registry.alias)
    assert str(version.version) == reg.version
    assert float(version.tags["val_segm_ap"]) == pytest.approx(
        outcome.best["val_segm_ap"], abs=1e-6
    )


def test_rerunning_the_same_search_name_restores_it(searched, capsys):
    from workflows.tune import run_tune

    config, first = searched
    again = run_tune(config, register=False)
    assert "resuming the search" in capsys.readouterr().out
    # The restored experiment holds the same two trials with the same outcomes: nothing re-ran.
    assert sorted(r["trial"] for r in again.rows) == sorted(r["trial"] for r in first.rows)
    assert {r["train.lr"]: r["status"] for r in again.rows} == {0.01: "OK", 1e30: "ERROR"}
    assert again.experiment_path == first.experiment_path
    # Issue 16: a restored search continues its MLflow parent run instead of starting another.
    assert again.parent_run_id == first.parent_run_id
