"""The Mask R-CNN baseline through the real Ray Train + MLflow loop (2 DDP workers on CPU)."""

from __future__ import annotations

import math

import pytest

from tests.helpers import tiny_config

pytestmark = pytest.mark.integration


def test_maskrcnn_trains_through_the_ray_loop_and_logs_to_mlflow(ray_session, tmp_path):
    from mlflow import MlflowClient

    from workflows.train_driver import run_training

    config = tiny_config(
        tmp_path,
        **{
            "model.arch": "maskrcnn",
            "train.epochs": 1,
            "registry.model_name": "pose2seg-baseline-test",
        },
    )
    outcome = run_training(config)

    assert outcome.metrics["epoch"] == 1
    assert math.isfinite(outcome.history[-1]["train_loss"])
    for key in ("val_segm_ap", "val_occluded_segm_ap", "best_val_segm_ap"):
        assert 0.0 <= outcome.metrics[key] <= 1.0, key
    assert outcome.metrics["val_num_images"] == config.data.synthetic_num_val
    # The baseline is for comparison only: never served, never registered.
    assert outcome.model_uri is None and outcome.registration is None

    client = MlflowClient(tracking_uri=config.registry.tracking_uri)
    run = client.get_run(outcome.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.arch"] == "maskrcnn"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_segm_ap")] == [1]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "baseline")]
    assert artifacts == ["baseline/model.pt"]
    assert not client.search_registered_models(f"name = '{config.registry.model_name}'")
