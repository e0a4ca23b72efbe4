"""Issue 16 on a real local Ray: each finding re-run as the issue describes it.

1-2. ``--resume``: an interrupted run continues the same MLflow run (one history).
3. A string in a train person's keypoints is a counted reject, not a preprocessing failure.
4. ``file_name`` escaping the images folder (``..``, a symlink) is an ``unsafe_path`` reject.
5. Expected errors (also inside Ray) are one line and exit 2; an unreadable image in predict is
   a counted reject in ``rejects.json`` and the job goes on.
6. Keypoints far outside the image are a counted ``keypoints_outside_image`` reject.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from PIL import Image

from pose2seg.config import Config
from tests.helpers import tiny_config

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------------------------
# Errors raised inside Ray reach the user as their own message
# --------------------------------------------------------------------------------------------


def _udf_raising(batch):
    from preprocessing.storage import resolve_inside

    resolve_inside("/data/images", "../../etc/passwd")  # raises UnsafePathError
    return batch


@pytest.mark.parametrize("original", [False, True])
def test_errors_inside_ray_data_are_one_line_with_their_own_message(
    ray_session, capsys, monkeypatch, original
):
    import ray
    from ray.data import DataContext

    from workflows.cli import run_main

    monkeypatch.delenv("POSE2SEG_DEBUG", raising=False)
    ctx = DataContext.get_current()
    monkeypatch.setattr(ctx, "raise_original_map_exception", original)

    def main(argv):
        ray.data.from_items([{"a": 1}]).map_batches(_udf_raising).take_all()

    assert run_main(main, []) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "holds a '..' component" in last
    assert "UDF failed" not in last


def test_errors_inside_a_ray_task_are_unwrapped(ray_session, capsys):
    import ray

    from workflows.cli import run_main

    @ray.remote
    def read():
        raise FileNotFoundError("no such file: s3://bucket/images/7.jpg")

    assert run_main(lambda argv: ray.get(read.remote()), []) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "error: FileNotFoundError: no such file: s3://bucket/images/7.jpg"


# --------------------------------------------------------------------------------------------
# Preprocessing: bad keypoints, unsafe paths, out-of-frame keypoints -> counted rejects
# --------------------------------------------------------------------------------------------


def _bad_dataset(tmp_path) -> tuple[Config, dict[str, int]]:
    """The tiny synthetic set rewritten as a COCO dataset with one bad record of each kind."""
    from preprocessing.synthetic import ensure_synthetic_dataset

    base = tiny_config(tmp_path)
    ensure_synthetic_dataset(base)
    root = tmp_path / "bad"
    shutil.copytree(base.data.root, root)
    outside = tmp_path / "outside"
    outside.mkdir()
    ann_path = root / "annotations" / "person_keypoints_train.json"
    coco = json.loads(ann_path.read_text())
    images = coco["images"]
    by_image: dict[int, list] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    ids = {}
    # 3: a string inside a training person's keypoints (the template pass used to crash on it).
    ann = by_image[images[0]["id"]][0]
    ann["keypoints"][4] = "abc"
    ids["malformed"] = ann["id"]
    # 6: a visible keypoint far outside the image.
    ann = by_image[images[1]["id"]][0]
    ann["keypoints"][0:3] = [5000, -300, 2]
    ids["outside"] = ann["id"]
    # 4: a file_name climbing out of images/train, and a symlink leading out of it.
    secret = outside / "secret.png"
    Image.new("RGB", (images[2]["width"], images[2]["height"]), (255, 0, 0)).save(secret)
    images[2]["file_name"] = "../../../outside/secret.png"
    ids["dotdot"] = images[2]["id"]
    link = root / "images" / "train" / images[3]["file_name"]
    link.unlink()
    Image.new("RGB", (images[3]["width"], images[3]["height"])).save(outside / "linked.png")
    os.symlink(outside / "linked.png", link)
    ids["symlink"] = images[3]["id"]
    ann_path.write_text(json.dumps(coco))
    config = base.with_overrides(
        {"data.source": "coco", "data.root": str(root), "data.processed": str(tmp_path / "p")}
    )
    return config, ids


def test_bad_train_records_are_counted_rejects_and_preprocessing_finishes(ray_session, tmp_path):
    from preprocessing import schema
    from preprocessing.pipeline import (
        REJECTS_DIR,
        _stored_rejects,
        load_split,
        preprocess_dataset,
        variant_dir,
    )
    from preprocessing.storage import join

    config, ids = _bad_dataset(tmp_path)
    summary = preprocess_dataset(config)
    train = summary.splits["train"]
    assert train.rejected.get("malformed_keypoints") == 1
    assert train.rejected.get("keypoints_outside_image") == 1
    assert train.rejected.get("unsafe_path") == 2
    assert train.rows_out == train.images_in - 2
    rejects = _stored_rejects(join(variant_dir(config), REJECTS_DIR), "train")
    by_reason = {}
    for r in rejects:
        by_reason.setdefault(r[schema.REJECT_REASON], []).append(r)
    assert by_reason["malformed_keypoints"][0][schema.REJECT_ANNOTATION_ID] == ids["malformed"]
    outside = by_reason["keypoints_outside_image"][0]
    assert outside[schema.REJECT_ANNOTATION_ID] == ids["outside"]
    assert "(5000, -300)" in outside[schema.REJECT_DETAIL]
    unsafe = {r[schema.REJECT_IMAGE_ID]: r[schema.REJECT_DETAIL] for r in by_reason["unsafe_path"]}
    assert set(unsafe) == {ids["dotdot"], ids["symlink"]}
    assert "symbolic link" in unsafe[ids["symlink"]] and "'..'" in unsafe[ids["dotdot"]]
    # Nothing from outside the images folder became a training row.
    stored = {
        r["image_id"] for r in load_split(config, "train").select_columns(["image_id"]).take_all()
    }
    assert ids["dotdot"] not in stored and ids["symlink"] not in stored


def test_preprocess_command_exits_2_on_missing_root_and_unreachable_s3(
    ray_session, tmp_path, capsys, monkeypatch
):
    from workflows import preprocess

    monkeypatch.delenv("POSE2SEG_DEBUG", raising=False)
    missing = ["--set", "data.source=coco", "--set", f"data.root={tmp_path / 'nowhere'}"]
    assert preprocess.main(missing) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # Which split's annotation file is looked for first is not the point: one line naming it.
    assert re.match(r"error: FileNotFoundError: data\.(train|val)_annotations: ", err[-1])
    assert "nowhere" in err[-1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    unreachable = ["--set", "data.source=coco", "--set", "data.root=s3://bucket/data"]
    assert preprocess.main(unreachable) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "127.0.0.1:9" in last and "Traceback" not in last


# --------------------------------------------------------------------------------------------
# Evaluate / predict: unknown models, bad keypoint files, unreadable images
# --------------------------------------------------------------------------------------------


def test_evaluate_unknown_model_and_bad_keypoint_file_exit_2(trained, tmp_path, capsys):
    import yaml

    from workflows import evaluate

    config, _ = trained
    # The trained fixture's own config (same synthetic data, same tracking store).
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    common = ["--config", str(config_path), "--set", f"eval.output_dir={tmp_path}", "--no-mlflow"]
    assert evaluate.main([*common, "--model", "models:/nope@champion"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nope" in last
    results = tmp_path / "kp.json"
    results.write_text(json.dumps([{"image_id": 987654, "keypoints": [0] * 51, "score": 1}]))
    model = trained[1].checkpoint_path
    assert evaluate.main([*common, "--model", model, "--keypoints", str(results)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "987654" in last and "not in the ground truth" in last


def test_predict_counts_unreadable_and_unsafe_images_and_goes_on(trained, tmp_path, capsys):
    from workflows import predict
    from workflows.predict import run_predict

    config, outcome = trained
    images = tmp_path / "images"
    shutil.copytree(os.path.join(config.data.root, config.data.val_images), images)
    gt_path = os.path.join(config.data.root, config.data.val_annotations)
    coco = json.loads(open(gt_path).read())
    broken, escaping = coco["images"][0], coco["images"][1]
    (images / broken["file_name"]).write_bytes(b"\x89PNG but not really")
    escaping["file_name"] = "../" + escaping["file_name"]
    kp_path = tmp_path / "kp.json"
    kp_path.write_text(json.dumps(coco))
    lenient = config.with_overrides({"eval.max_reject_fraction": 0.5, "eval.num_overlays": 2})
    summary = run_predict(
        lenient,
        model_ref=outcome.checkpoint_path,
        images_uri=str(images),
        keypoints_uri=str(kp_path),
        out_dir=str(tmp_path / "out"),
    )
    rejects = json.loads(open(summary["rejects_path"]).read())
    assert {(r["image_id"], r["reason"]) for r in rejects} == {
        (broken["id"], "image_unreadable"),
        (escaping["id"], "unsafe_path"),
    }
    assert summary["rejected_images"] == 2 and summary["images"] == len(coco["images"])
    results = json.loads(open(summary["results_path"]).read())
    predicted = {r["image_id"] for r in results}
    assert predicted and not predicted & {broken["id"], escaping["id"]}
    assert len(summary["overlays"]) == 2
    # Above eval.max_reject_fraction the command fails: one line naming rejects.json, exit 2.
    argv = [
        "--model",
        outcome.checkpoint_path,
        "--images",
        str(images),
        "--keypoints",
        str(kp_path),
        "--out",
        str(tmp_path / "strict"),
        "--set",
        "eval.max_reject_fraction=0.1",
        "--set",
        f"registry.tracking_uri={config.registry.tracking_uri}",
    ]
    assert predict.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "images rejected" in last and "rejects.json" in last
    assert (tmp_path / "strict" / "rejects.json").is_file()


# --------------------------------------------------------------------------------------------
# Resume continues the same MLflow run
# --------------------------------------------------------------------------------------------
