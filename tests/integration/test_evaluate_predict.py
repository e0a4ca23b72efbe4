"""evaluate.py and predict.py on a registered model: Ray Data inference, pycocotools parity,
predicted-keypoint input, the real COCO sample, overlays, clear errors for bad inputs."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

pytestmark = pytest.mark.integration


def _pycocotools_ap(annotation_file: str, results_file: str) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(annotation_file)
        ev = COCOeval(gt, gt.loadRes(results_file), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    from workflows.evaluate import run_evaluate

    config, outcome = trained
    config = config.with_overrides({"eval.output_dir": str(tmp_path_factory.mktemp("eval"))})
    model_ref = f"models:/{config.registry.model_name}@{config.registry.alias}"
    return config, model_ref, run_evaluate(config, model_ref=model_ref, split="val")


def test_printed_ap_is_pycocotools_on_the_results_file(evaluated):
    from workflows.eval_io import split_paths

    config, _, out = evaluated
    annotations, _ = split_paths(config, "val")
    assert out.metrics["segm_ap"] == _pycocotools_ap(annotations, out.results_path)
    with open(out.results_path) as fh:
        results = json.load(fh)
    gt = json.loads(open(annotations).read())
    with_kpts = [a for a in gt["annotations"] if a["num_keypoints"] > 0 and not a["iscrowd"]]
    assert len(results) == len(with_kpts)  # one mask per person given, no detector, no NMS
    assert out.inference["images"] == len(gt["images"])


def test_occlusion_table_overlays_and_mlflow_run(evaluated):
    from mlflow import MlflowClient

    config, _, out = evaluated
    assert [r["bin"] for r in out.occlusion][0].startswith("[0")
    assert sum(r["num_people"] for r in out.occlusion) > 0
    assert os.path.isfile(os.path.join(out.output_dir, "occlusion.md"))
    assert len(out.overlays) == min(config.eval.num_overlays, config.data.synthetic_num_val)
    assert all(os.path.getsize(p) > 0 for p in out.overlays)
    run = MlflowClient(tracking_uri=config.registry.tracking_uri).get_run(out.mlflow_run_id)
    assert run.data.metrics["val_segm_ap"] == out.metrics["segm_ap"]


def test_predicted_keypoints_file_gives_the_same_masks_as_gt(evaluated, tmp_path):
    from workflows.eval_io import split_paths
    from workflows.evaluate import run_evaluate

    config, model_ref, out = evaluated
    annotations, _ = split_paths(config, "val")
    gt = json.loads(open(annotations).read())
    kp_results = [
        {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 0.9}
        for a in gt["annotations"]
        if a["num_keypoints"] > 0
    ]
    path = tmp_path / "keypoints.json"
    path.write_text(json.dumps(kp_results))
    again = run_evaluate(
        config, model_ref=model_ref, split="val", keypoints=str(path), log_to_mlflow=False
    )
    assert again.metrics["segm_ap"] == out.metrics["segm_ap"]


def test_bad_keypoint_results_are_named(evaluated, tmp_path):
    from workflows.eval_io import KeypointResultsError
    from workflows.evaluate import run_evaluate

    config, model_ref, _ = evaluated
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"image_id": 987654, "keypoints": [0] * 51, "score": 1}]))
    with pytest.raises(KeypointResultsError, match="987654"):
        run_evaluate(config, model_ref=model_ref, keypoints=str(unknown), log_to_mlflow=False)
    from workflows.eval_io import split_paths

    first_id = json.loads(open(split_paths(config, "val")[0]).read())["images"][0]["id"]
    malformed = tmp_path / "malformed.json"
    malformed.write_text(json.dumps([{"image_id": first_id, "keypoints": [1, 2, 3], "score": 1}]))
    with pytest.raises(KeypointResultsError, match="entry 0.*malformed keypoints"):
        run_evaluate(config, model_ref=model_ref, keypoints=str(malformed), log_to_mlflow=False)


def test_real_coco_sample_end_to_end(trained, coco_sample_dir, tmp_path):
    from workflows.evaluate import run_evaluate

    config, outcome = trained
    config = config.with_overrides(
        {
            "data.source": "coco",
            "data.root": str(coco_sample_dir),
            "data.val_annotations": "person_keypoints_sample.json",
            "data.val_images": ".",
            "eval.output_dir": str(tmp_path),
            "eval.num_overlays": 2,
            # Issue 14: the default protocol ignores people without keypoints; "miss" scores
            # against the annotation file as it is.
            "eval.protocol": "miss",
        }
    )
    out = run_evaluate(config, model_ref=outcome.checkpoint_path, split="val", log_to_mlflow=False)
    assert (
        out.inference["images"] == 4 and out.inference["people"] == 12
    )  # 2 of 14 have no keypoints
    assert out.metrics["segm_ap"] == _pycocotools_ap(
        str(coco_sample_dir / "person_keypoints_sample.json"), out.results_path
    )
    assert len(out.overlays) == 2


def test_predict_writes_results_and_overlays(trained, coco_sample_dir, tmp_path):
    from pycocotools import mask as mask_utils

    from workflows.predict import run_predict

    config, _ = trained
    model_ref = f"models:/{config.registry.model_name}@{config.registry.alias}"
    summary = run_predict(
        config.with_overrides({"eval.num_overlays": 4}),
        model_ref=model_ref,
        images_uri=str(coco_sample_dir),
        keypoints_uri=str(coco_sample_dir / "person_keypoints_sample.json"),
        out_dir=str(tmp_path / "pred"),
    )
    results = json.loads(open(summary["results_path"]).read())
    assert summary["num_results"] == len(results) == 12
    sizes = {r["image_id"]: tuple(mask_utils.decode(r["segmentation"]).shape) for r in results}
    assert sizes[785] == (425, 640)
    assert len(summary["overlays"]) == 4


def test_degraded_keypoints_robustness_evaluation(evaluated):
    """eval.keypoint_drop_prob / keypoint_jitter: seeded, people left without a keypoint are
    missed, the label reaches metrics.json and MLflow."""
    from mlflow import MlflowClient

    from workflows.evaluate import run_evaluate_splits

    config, model_ref, out = evaluated
    with open(out.results_path) as fh:
        clean = json.load(fh)

    def run(**keys):
        cfg = config.with_overrides({f"eval.{k}": v for k, v in keys.items()})
        res = run_evaluate_splits(cfg, model_ref=model_ref, splits=["val"])
        with open(res.splits["val"].results_path) as fh:
            return res, json.load(fh)

    everyone, none_left = run(keypoint_drop_prob=1.0)
    assert none_left == [] and everyone.splits["val"].metrics["segm_ap"] <= 0.0
    degraded, first = run(keypoint_drop_prob=0.3, keypoint_jitter=0.5)
    _, again = run(keypoint_drop_prob=0.3, keypoint_jitter=0.5)
    _, other_seed = run(keypoint_drop_prob=0.3, keypoint_jitter=0.5, keypoint_noise_seed=1)
    assert 0 < len(first) <= len(clean)
    assert first == again  # seeded by (seed, image id)
    assert first != other_seed
    assert first != clean  # moved keypoints, other masks
    assert degraded.keypoints == "gt (drop 0.3, jitter 0.5, seed 0)"
    with open(os.path.join(degraded.splits["val"].output_dir, "metrics.json")) as fh:
        assert json.load(fh)["keypoints"] == degraded.keypoints
    run_tags = MlflowClient(tracking_uri=config.registry.tracking_uri).get_run(
        degraded.mlflow_run_id
    )
    assert run_tags.data.tags["pose2seg.keypoints"] == degraded.keypoints
