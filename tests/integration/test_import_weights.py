"""``workflows/import_weights.py``: the official weights (here the fixture's rule-built state
dict, saved with ``torch.save`` as the official release is) -> our paper-mode network ->
a registered MLflow model ``models:/pose2seg-paper@official`` that loads back with the same
tensors; bad checkpoints exit 2 with one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.official_weights_fixture import (
    OFFICIAL_REFERENCE,
    official_state_dict,
    requires_official_reference,
)

pytestmark = [pytest.mark.integration, requires_official_reference]


@pytest.fixture(scope="module")
def official():
    return official_state_dict()


@pytest.fixture(scope="module")
def release(official, tmp_path_factory):
    path = tmp_path_factory.mktemp("release") / "pose2seg_release.pkl"
    torch.save(official, path)
    return path


def _assert_official_masks(predictor, *, image_id: int) -> None:
    import json

    from pycocotools import mask as mask_utils

    cv2 = pytest.importorskip("cv2")
    sample = OFFICIAL_REFERENCE.parent / "coco_person_sample"
    if not (sample / "person_keypoints_sample.json").is_file():
        pytest.skip(f"the COCO person sample is absent ({sample})")
    ref = json.loads((OFFICIAL_REFERENCE / "reference.json").read_text())
    coco = json.loads((sample / "person_keypoints_sample.json").read_text())
    image = next(im for im in ref["images"] if im["image_id"] == image_id)
    anns = [a for a in coco["annotations"] if a["image_id"] == image_id and not a.get("iscrowd")]
    kpts = np.asarray([a.get("keypoints") or [0] * 51 for a in anns], np.float32)
    bgr = cv2.imread(str(sample / image["file_name"]))
    results = predictor.predict(np.ascontiguousarray(bgr[..., ::-1]), kpts.reshape(-1, 17, 3))
    by_ann = {p["ann_id"]: p for p in ref["people"]}
    assert len(results) == len(anns) == 5
    for ann, result in zip(anns, results, strict=True):
        ours = mask_utils.decode(result["segmentation"]).astype(bool)
        official = mask_utils.decode(by_ann[ann["id"]]["mask"]["segmentation"]).astype(bool)
        assert (ours & official).sum() / (ours | official).sum() >= 0.999, ann["id"]


def _args(checkpoint, mlflow_uri, *extra):
    return [
        "--checkpoint",
        str(checkpoint),
        "--set",
        f"registry.tracking_uri={mlflow_uri}",
        "--set",
        "registry.experiment=import-test",
        *extra,
    ]


def test_import_registers_the_official_weights(
    official, release, mlflow_uri, tmp_path, s3_server, s3_bucket, capsys
):
    import boto3
    import mlflow

    from pose2seg.arch import load_predictor
    from pose2seg.official_weights import map_official_state_dict
    from workflows.batch_inference import resolve_checkpoint_dir
    from workflows.import_weights import main

    assert main(_args(release, mlflow_uri, "--out", str(tmp_path / "ckpt"))) == 0
    assert "registered models:/pose2seg-paper@official (version 1)" in capsys.readouterr().out

    mlflow.set_tracking_uri(mlflow_uri)
    local = resolve_checkpoint_dir("models:/pose2seg-paper@official", str(tmp_path / "dl"))
    predictor = load_predictor(local)
    expected = map_official_state_dict(official, predictor.model)
    got = predictor.model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    config = predictor.training_config.model
    assert (config.backbone_style, config.seg_style, config.skeleton_rendering) == (
        "official",
        "official",
        "official",
    )
    # The 3 official templates and their 3 mirrors; absent joints are NaN.
    assert predictor.templates.shape == (6, 17, 2)
    assert np.isnan(predictor.templates[1]).any() and not np.isnan(predictor.templates[0]).any()

    # Imported, registered, loaded -> the official masks (the 5 people of image 197388).
    _assert_official_masks(predictor, image_id=197388)

    # A DataParallel save (module. prefix), read from s3://, only written as a checkpoint
    # folder (--no-mlflow): the same tensors, and the registry is untouched.
    prefixed = tmp_path / "module.pkl"
    torch.save({f"module.{k}": v for k, v in official.items()}, prefixed)
    boto3.client("s3").upload_file(str(prefixed), s3_bucket, "weights/module.pkl")
    uri = f"s3://{s3_bucket}/weights/module.pkl"
    assert main(_args(uri, mlflow_uri, "--out", str(tmp_path / "ckpt2"), "--no-mlflow")) == 0
    first = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    second = torch.load(tmp_path / "ckpt2" / "model.pt", weights_only=True)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    versions = mlflow.MlflowClient(mlflow_uri).search_model_versions("name='pose2seg-paper'")
    assert len(versions) == 1


def test_bad_checkpoints_exit_2_with_one_line(official, release, mlflow_uri, tmp_path, capsys):
    from workflows.import_weights import main

    wrong = tmp_path / "notes.txt"
    wrong.write_text("not a checkpoint")
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(release.read_bytes()[: 1 << 20])
    mismatched = tmp_path / "mismatched.pkl"
    broken = dict(official)
    del broken["segnet.pred_small.weight"]
    broken["backbone.fpn_c2p2.bias"] = torch.zeros(128)
    torch.save(broken, mismatched)
    cases = {
        wrong: "not a readable torch checkpoint",
        truncated: "not a readable torch checkpoint",
        mismatched: "missing [seg.head.weight] (1)",
        tmp_path / "absent.pkl": "absent.pkl",
    }
    for path, needle in cases.items():
        assert main(_args(path, mlflow_uri)) == 2, path
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and needle in err, err
    err_mismatch = "backbone.lateral.1.bias (128,) != (256,)"
    assert main(_args(mismatched, mlflow_uri)) == 2
    assert err_mismatch in capsys.readouterr().err
    # Not the official network: the config key is named.
    assert main(_args(release, mlflow_uri, "--set", "model.seg_style=ours")) == 2
    assert "model.seg_style='ours'" in capsys.readouterr().err
