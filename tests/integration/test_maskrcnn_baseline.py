"""The Mask R-CNN baseline through the real Ray Train + MLflow loop (2 DDP workers on CPU)."""

from __future__ import annotations

import math

import pytest

from pose2seg.config import Config

pytestmark = pytest.mark.integration


def tiny_config(tmp_path, **extra) -> Config:
    """The tiny dataset of test_train_workflow.py, with the baseline's arch."""
    overrides = {
        "data.root": str(tmp_path / "synthetic"),
        "data.processed": str(tmp_path / "processed"),
        "data.input_size": 96,
        "data.images_per_shard": 8,
        "data.synthetic_num_train": 16,
        "data.synthetic_num_val": 8,
        "data.synthetic_image_size": 96,
        "data.synthetic_max_people": 3,
        "model.arch": "maskrcnn",
        "model.backbone_depth": 18,
        "model.fpn_channels": 16,
        "model.roi_size": 16,
        "model.num_templates": 2,
        "train.num_workers": 2,
        "train.cpus_per_worker": 0.5,
        "train.epochs": 1,
        "train.batch_size": 4,
        "train.warmup_steps": 2,
        "train.storage_path": str(tmp_path / "runs"),
        "registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "registry.model_name": "pose2seg-baseline-test",
        "eval.batch_size": 4,
    }
    overrides.update(extra)
    return Config().with_overrides(overrides)


def test_maskrcnn_trains_through_the_ray_loop_and_logs_to_mlflow(ray_session, tmp_path):
    from mlflow import MlflowClient

    from workflows.training import run_training

    config = tiny_config(tmp_path)
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
