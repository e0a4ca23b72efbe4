"""The keypoint-detector stage in the batch commands: predict.py on a folder of images without
keypoints, evaluate.py with detected keypoints. Keypoint R-CNN runs with random weights read
from a local file (never downloaded): the plumbing is tested, not the detector's accuracy."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def detector_config(trained, tmp_path_factory):
    import torch

    from pose2seg.keypoint_detector import build_keypoint_rcnn

    config, _ = trained
    tmp = tmp_path_factory.mktemp("detector")
    torch.manual_seed(0)
    weights = tmp / "kprcnn.pth"
    torch.save(build_keypoint_rcnn(min_size=96, max_size=128).state_dict(), weights)
    return config.with_overrides(
        {
            "detector.weights": str(weights),
            "detector.min_size": 96,
            "detector.max_size": 128,
            # Random weights score people around 0.05: keep 2 per image.
            "detector.person_score_threshold": 0.0,
            "detector.max_people": 2,
            "eval.output_dir": str(tmp / "eval"),
            "eval.num_overlays": 2,
        }
    )


def test_predict_on_a_folder_of_images_alone(detector_config, tmp_path):
    from pycocotools import mask as mask_utils

    from workflows.eval_io import split_paths
    from workflows.predict import run_predict

    config = detector_config
    _, images_dir = split_paths(config, "val")
    names = sorted(f for f in os.listdir(images_dir) if f.endswith((".png", ".jpg")))
    model_ref = f"models:/{config.registry.model_name}@{config.registry.alias}"
    summary = run_predict(
        config,
        model_ref=model_ref,
        images_uri=images_dir,
        keypoints_uri=None,
        out_dir=str(tmp_path / "pred"),
    )
    assert summary["images"] == len(names)
    detected = json.loads((tmp_path / "pred" / "keypoints.json").read_text())
    images = json.loads((tmp_path / "pred" / "images.json").read_text())
    assert sorted(im["file_name"] for im in images) == names
    assert len(detected) == 2 * len(names)  # max_people per image at threshold 0
    assert all(len(d["keypoints"]) == 51 for d in detected)
    results = json.loads(open(summary["results_path"]).read())
    usable = [d for d in detected if any(v > 0 for v in d["keypoints"][2::3])]
    assert len(results) == summary["num_results"] == len(usable)
    ids = {im["id"] for im in images}
    assert {r["image_id"] for r in results} <= ids
    assert all(mask_utils.decode(r["segmentation"]).ndim == 2 for r in results)
    assert len(summary["overlays"]) == 2


def test_evaluate_with_detected_keypoints(detector_config):
    from workflows.evaluate import run_evaluate

    config = detector_config
    model_ref = f"models:/{config.registry.model_name}@{config.registry.alias}"
    out = run_evaluate(
        config, model_ref=model_ref, split="val", keypoints="detector", log_to_mlflow=False
    )
    assert out.inference["people"] == 2 * config.data.synthetic_num_val
    assert 0.0 <= out.metrics["segm_ap"] <= 1.0
    with open(os.path.join(out.output_dir, "metrics.json")) as fh:
        assert json.load(fh)["keypoints"] == "detector"


def test_bad_detector_weights_are_named(detector_config, tmp_path):
    from workflows.predict import run_predict

    config = detector_config.with_overrides({"detector.weights": str(tmp_path / "missing.pth")})
    from workflows.eval_io import split_paths

    with pytest.raises(Exception, match="detector.weights"):
        run_predict(
            config,
            model_ref=f"models:/{config.registry.model_name}@{config.registry.alias}",
            images_uri=split_paths(config, "val")[1],
            keypoints_uri=None,
            out_dir=str(tmp_path / "pred"),
        )
