"""One prediction path and one evaluation protocol (issue 14): the AP of training-time
validation is the AP evaluate.py reports for the same checkpoint and split, on the synthetic
set and on the real COCO sample; the pyfunc's masks are evaluate.py's, pixel for pixel; an
OCHuman-shaped dataset (val + test, one image folder) is evaluated in one command."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.integration

AP_TOLERANCE = 0.002


def _checkpoint_val_ap(checkpoint_path: str) -> float:
    from pose2seg.checkpoint import load_checkpoint

    return float(load_checkpoint(checkpoint_path).state["metrics"]["val_segm_ap"])


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


def _validation_masks(config, checkpoint_path: str) -> dict[tuple[int, int], dict]:
    """(image id, person index) -> RLE, predicted from the stored val rows by the function
    training-time validation calls (``predict_rows``) with the checkpoint's weights."""
    import torch

    from pose2seg.arch import build_model
    from pose2seg.checkpoint import load_checkpoint
    from preprocessing.pipeline import load_split
    from workflows.train_validation import load_validation_data, predict_rows

    loaded = load_checkpoint(checkpoint_path)
    model = build_model(loaded.config.model)
    model.load_state_dict(loaded.model_state)
    rows = load_split(config, "val").take_all()
    results = predict_rows(
        model,
        rows,
        config=loaded.config,
        device=torch.device("cpu"),
        templates=loaded.templates,
        keypoints=load_validation_data(config).keypoints,
    )
    return {(r["image_id"], r["person_index"]): r["segmentation"] for r in results}


def _evaluate_masks(results_path: str) -> dict[tuple[int, int], dict]:
    results = json.loads(open(results_path).read())
    return {(r["image_id"], r["person_index"]): r["segmentation"] for r in results}


def test_validation_ap_is_evaluate_ap_on_the_synthetic_set(trained, tmp_path):
    from workflows.evaluate import run_evaluate

    config, outcome = trained
    logged = _checkpoint_val_ap(outcome.checkpoint_path)
    # The registry's alias rule used that same AP.
    assert outcome.registration.val_ap == pytest.approx(logged)
    assert outcome.metrics["best_val_segm_ap"] == pytest.approx(logged)
    config = config.with_overrides({"eval.output_dir": str(tmp_path), "eval.num_overlays": 0})
    out = run_evaluate(config, model_ref=outcome.checkpoint_path, split="val", log_to_mlflow=False)
    assert abs(out.metrics["segm_ap"] - logged) <= AP_TOLERANCE, (out.metrics["segm_ap"], logged)
    # And it is pycocotools on the written files, unchanged.
    assert out.metrics["segm_ap"] == _pycocotools_ap(out.gt_path, out.results_path)
    # Beyond the AP: validation's masks are evaluate.py's, pixel for pixel.
    evaluated = _evaluate_masks(out.results_path)
    assert len(evaluated) > 0
    from pycocotools import mask as mask_utils

    assert sum(mask_utils.area(_rle_bytes(r)) > 0 for r in evaluated.values()) > 0
    assert _validation_masks(config, outcome.checkpoint_path) == evaluated
    print(f"synthetic val AP: validation {logged:.4f}, evaluate.py {out.metrics['segm_ap']:.4f}")


def _offset_checkpoint(src: str, dst, offset: float) -> str:
    """A copy of a checkpoint whose mask logits are shifted by ``offset``: the tiny test model
    scores AP 0 on its own, and a parity of zeros would prove little."""
    import torch

    from pose2seg.checkpoint import MODEL_FILE

    shutil.copytree(src, dst)
    path = dst / MODEL_FILE
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["seg.head.bias"] = state["seg.head.bias"] + offset
    torch.save(state, path)
    return str(dst)


def _coco_sample_with_degenerate_people(coco_sample_dir, root) -> None:
    """The COCO sample as train and val annotation files, with one person cut to two
    keypoints and one to a single keypoint (the fallback runs in both paths)."""
    gt = json.loads((coco_sample_dir / "person_keypoints_sample.json").read_text())
    with_kp = [a for a in gt["annotations"] if a["num_keypoints"] > 0]
    for ann, keep in ((with_kp[5], 2), (with_kp[7], 1)):
        kp = np.asarray(ann["keypoints"], dtype=np.float64).reshape(17, 3)
        labelled = np.flatnonzero(kp[:, 2] > 0)
        kp[labelled[keep:]] = 0
        ann["keypoints"] = kp.reshape(-1).tolist()
        ann["num_keypoints"] = keep
    root.mkdir(parents=True, exist_ok=True)
    for name in ("train.json", "val.json"):
        (root / name).write_text(json.dumps(gt))


def test_validation_ap_is_evaluate_ap_on_the_real_coco_sample(trained, coco_sample_dir, tmp_path):
    """``validate`` (the function every training epoch calls) on the preprocessed COCO sample
    against evaluate.py on its files, for the same checkpoint."""
    import torch

    from pose2seg.arch import build_model
    from pose2seg.checkpoint import load_checkpoint
    from preprocessing.pipeline import load_split, preprocess_dataset
    from workflows.evaluate import run_evaluate
    from workflows.train_validation import load_validation_data, validate

    config, outcome = trained
    checkpoint = _offset_checkpoint(outcome.checkpoint_path, tmp_path / "checkpoint", 2.0)
    root = tmp_path / "coco"
    _coco_sample_with_degenerate_people(coco_sample_dir, root)
    config = config.with_overrides(
        {
            "data.source": "coco",
            "data.root": str(root),
            "data.train_annotations": "train.json",
            "data.train_images": str(coco_sample_dir),
            "data.val_annotations": "val.json",
            "data.val_images": str(coco_sample_dir),
            "data.processed": str(tmp_path / "processed"),
            "eval.output_dir": str(tmp_path / "eval"),
            "eval.num_overlays": 0,
        }
    )
    for protocol in ("ignore", "miss"):
        cfg = config.with_overrides({"eval.protocol": protocol})
        preprocess_dataset(cfg)
        loaded = load_checkpoint(checkpoint)
        model = build_model(loaded.config.model)
        model.load_state_dict(loaded.model_state)
        metrics = validate(
            model,
            load_split(cfg, "val"),
            config=cfg.with_overrides(
                {k: v for k, v in loaded.config.to_flat().items() if k.startswith("model.")}
            ),
            device=torch.device("cpu"),
            rank=0,
            world=1,
            val_data=load_validation_data(cfg),
            templates=loaded.templates,
        )
        out = run_evaluate(cfg, model_ref=checkpoint, split="val", log_to_mlflow=False)
        assert out.inference["people"] == 12
        assert out.metrics["num_fallback"] == 2 == metrics["val_num_fallback"]
        assert metrics["val_num_images_predicted"] == 4
        assert abs(out.metrics["segm_ap"] - metrics["val_segm_ap"]) <= AP_TOLERANCE, protocol
        assert out.metrics["segm_ap"] > 0.005  # a real AP, not a parity of zeros
        assert _validation_masks(cfg, checkpoint) == _evaluate_masks(out.results_path)
        print(
            f"COCO sample ({protocol}): validation AP {metrics['val_segm_ap']:.4f}, "
            f"evaluate.py {out.metrics['segm_ap']:.4f}"
        )
        assert out.metrics["segm_ap"] == _pycocotools_ap(out.gt_path, out.results_path)
        people = 12 if protocol == "ignore" else 14  # the 2 without keypoints: ignored or missed
        assert out.metrics["num_people"] == people == metrics["val_num_people"]


def _rle_bytes(rle: dict) -> dict:
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


def test_pyfunc_masks_are_evaluate_masks_pixel_for_pixel(trained, coco_sample_dir, tmp_path):
    import mlflow
    import pandas as pd
    from pycocotools import mask as mask_utils

    from workflows.evaluate import run_evaluate

    config, _ = trained
    model_ref = f"models:/{config.registry.model_name}@{config.registry.alias}"
    config = config.with_overrides(
        {
            "data.source": "coco",
            "data.root": str(coco_sample_dir),
            "data.val_annotations": "person_keypoints_sample.json",
            "data.val_images": ".",
            "eval.output_dir": str(tmp_path),
            "eval.num_overlays": 0,
        }
    )
    out = run_evaluate(config, model_ref=model_ref, split="val", log_to_mlflow=False)
    evaluated = json.loads(open(out.results_path).read())
    mlflow.set_tracking_uri(config.registry.tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(model_ref)
    gt = json.loads((coco_sample_dir / "person_keypoints_sample.json").read_text())
    compared = nonempty = 0
    for image in gt["images"]:
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
        served = pyfunc.predict(frame)
        mine = [r for r in evaluated if r["image_id"] == image["id"]]
        assert len(served) == len(mine) == len(people)
        for (_, row), res in zip(served.iterrows(), mine, strict=True):
            assert json.loads(row["segmentation"]) == res["segmentation"]
            assert row["score"] == pytest.approx(res["score"], abs=1e-6)
            assert row["person_index"] == res["person_index"]
            compared += 1
            nonempty += int(mask_utils.area(_rle_bytes(res["segmentation"])) > 0)
    assert compared == 12 and nonempty > 0


def test_ochuman_shaped_dataset_gets_both_tables_in_one_command(
    trained, coco_sample_dir, tmp_path, capsys
):
    from workflows.evaluate import main

    config, outcome = trained
    gt = json.loads((coco_sample_dir / "person_keypoints_sample.json").read_text())
    root = tmp_path / "ochuman"
    (root / "images").mkdir(parents=True)
    for image in gt["images"]:
        shutil.copy(coco_sample_dir / image["file_name"], root / "images" / image["file_name"])
    halves = {"val": gt["images"][:2], "test": gt["images"][2:]}
    for split, images in halves.items():
        ids = {im["id"] for im in images}
        part = {
            **gt,
            "images": images,
            "annotations": [a for a in gt["annotations"] if a["image_id"] in ids],
        }
        (root / f"ochuman_coco_format_{split}_range_0.00_1.00.json").write_text(json.dumps(part))
    code = main(
        [
            "--config",
            "configs/ochuman_eval.yaml",
            "--model",
            outcome.checkpoint_path,
            "--set",
            f"data.root={root}",
            "--set",
            f"data.processed={tmp_path / 'processed'}",
            "--set",
            f"eval.output_dir={tmp_path / 'out'}",
            "--set",
            f"registry.tracking_uri={config.registry.tracking_uri}",
            "--set",
            "eval.num_overlays=0",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| split | images | people | AP | AP50 | AP75 | AP MaxIoU [0, 0.1)")
    assert table[1].startswith("| val | 2 |") and table[2].startswith("| test | 2 |")
    assert "[val] segm AP" in printed and "[test] segm AP" in printed
    outs = sorted((tmp_path / "out").glob("eval-val-test-*"))
    assert len(outs) == 1
    for split in ("val", "test"):
        metrics = json.loads((outs[0] / split / "metrics.json").read_text())
        assert metrics["split"] == split
        assert metrics["inference"]["images"] == 2
        assert metrics["metrics"]["segm_ap"] == _pycocotools_ap(
            str(outs[0] / split / "ground_truth.json"), str(outs[0] / split / "results.json")
        )
