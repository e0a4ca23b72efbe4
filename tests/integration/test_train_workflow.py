"""train.py end to end on a real local Ray (2 workers), a real SQLite MLflow store and registry."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def test_run_reports_every_epoch_and_a_real_ap(trained):
    config, outcome = trained
    assert outcome.metrics["epoch"] == config.train.epochs
    assert len(outcome.history) == config.train.epochs
    ap = outcome.metrics["val_segm_ap"]
    assert 0.0 <= ap <= 1.0
    assert outcome.metrics["val_num_images"] == config.data.synthetic_num_val
    assert np.isfinite(outcome.history[-1]["train_loss"])
    # The share of worker time spent on input is a real fraction, measured every epoch.
    assert all(0.0 <= h["train_input_fraction"] < 1.0 for h in outcome.history)


def test_mlflow_run_has_params_metrics_and_model(trained):
    from mlflow import MlflowClient

    config, outcome = trained
    client = MlflowClient(tracking_uri=config.registry.tracking_uri)
    run = client.get_run(outcome.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.roi_size"] == "16"
    assert run.data.params["train.epochs"] == "2"
    assert set(config.to_flat()) <= set(run.data.params)
    # The precision each worker resolved, and why (the tiny config pins fp32).
    assert run.data.params["train.precision_resolved"] == "fp32"
    assert run.data.params["train.precision_reason"] == "set to fp32"
    history = client.get_metric_history(outcome.mlflow_run_id, "val_segm_ap")
    assert sorted(m.step for m in history) == [1, 2]
    assert client.get_metric_history(outcome.mlflow_run_id, "train_loss")


def test_registered_model_loads_by_alias_and_predicts(trained, coco_sample_dir):
    import mlflow
    import pandas as pd
    from pycocotools import mask as mask_utils

    config, outcome = trained
    reg = outcome.registration
    assert reg is not None and reg.alias_moved and reg.version == "1"
    mlflow.set_tracking_uri(config.registry.tracking_uri)
    model = mlflow.pyfunc.load_model(
        f"models:/{config.registry.model_name}@{config.registry.alias}"
    )
    gt = json.loads((coco_sample_dir / "person_keypoints_sample.json").read_text())
    image = gt["images"][0]
    people = [
        a["keypoints"]
        for a in gt["annotations"]
        if a["image_id"] == image["id"] and a["num_keypoints"] > 0
    ]
    frame = pd.DataFrame(
        {
            "image": [(coco_sample_dir / image["file_name"]).read_bytes()],
            "keypoints": [json.dumps(people)],
            "image_id": [image["id"]],
        }
    )
    out = model.predict(frame)
    assert list(out.columns) == ["image_id", "person_index", "score", "segmentation", "fallback"]
    assert len(out) == len(people)
    rle = json.loads(out.iloc[0]["segmentation"])
    assert rle["size"] == [image["height"], image["width"]]
    assert mask_utils.decode(rle).shape == (image["height"], image["width"])


def test_alias_moves_only_for_a_better_model(trained):
    from mlflow import MlflowClient

    from workflows.mlflow_tracking import RunHandle, register_if_better

    config, outcome = trained
    handle = RunHandle(
        tracking_uri=config.registry.tracking_uri, run_id=outcome.mlflow_run_id, experiment_id=""
    )
    holder_ap = outcome.registration.val_ap
    worse = register_if_better(config, handle, outcome.model_uri, val_ap=holder_ap - 0.1)
    assert not worse.alias_moved and worse.previous_version == "1"
    better = register_if_better(config, handle, outcome.model_uri, val_ap=holder_ap + 0.1)
    assert better.alias_moved
    client = MlflowClient(tracking_uri=config.registry.tracking_uri)
    holder = client.get_model_version_by_alias(config.registry.model_name, "champion")
    assert str(holder.version) == better.version
