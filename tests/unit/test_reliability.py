"""Issue 16, the Ray-free parts: unsafe paths, keypoints outside the image, the one keypoint
validation of the template pass, one-line error exits, resume checks, MLflow run continuation,
batch-inference rejects and the pyfunc's 400 messages."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pose2seg.config import Config, ConfigError
from pose2seg.keypoint_checks import (
    REASON_OUTSIDE_IMAGE,
    describe_outside_keypoints,
    keypoints_outside_image,
    outside_image_rejects,
    people_keypoints,
)
from preprocessing import storage
from preprocessing.coco import IMAGE_LEVEL_REASONS, REJECT_REASONS, CocoPersonDataset
from workflows import cli

# --------------------------------------------------------------------------------------------
# A tiny COCO set on disk
# --------------------------------------------------------------------------------------------


def _keypoints(x: float, y: float, v: int = 2) -> list[float]:
    kps = np.zeros((17, 3))
    kps[:, 0], kps[:, 1], kps[:, 2] = x, y, v
    # Spread them a little so that templates can be fitted on them.
    kps[:, 0] += np.arange(17) % 3
    kps[:, 1] += np.arange(17) // 3
    return kps.reshape(-1).tolist()


def _person(ann_id: int, image_id: int, **overrides: Any) -> dict[str, Any]:
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "iscrowd": 0,
        "segmentation": [[4, 4, 12, 4, 12, 20, 4, 20]],
        "area": 128.0,
        "bbox": [4.0, 4.0, 8.0, 16.0],
        "keypoints": _keypoints(6, 8),
    }
    ann.update(overrides)
    return ann


def _coco(root: Path, images: list[dict], annotations: list[dict]) -> CocoPersonDataset:
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for info in images:
        path = image_dir / info["file_name"]
        if not info.get("_skip"):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (info["width"], info["height"]), (10, 20, 30)).save(path)
    images = [{k: v for k, v in im.items() if not k.startswith("_")} for im in images]
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person"}],
    }
    (root / "ann.json").write_text(json.dumps(coco))
    return CocoPersonDataset(str(root / "ann.json"), str(image_dir), split="train")


def _image(image_id: int, name: str = "", **extra: Any) -> dict[str, Any]:
    return {"id": image_id, "file_name": name or f"{image_id}.png", "height": 24, "width": 16}


# --------------------------------------------------------------------------------------------
# Unsafe paths
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../../../../outside/secret.jpg",
        "../x.png",
        "a/../../x.png",
        "/etc/passwd",
        "s3://other-bucket/x.png",
        "a\\..\\..\\x.png",
        "",
        "C:/x.png",
    ],
)
def test_resolve_inside_rejects_names_that_leave_the_root(tmp_path, name):
    with pytest.raises(storage.UnsafePathError, match="must stay inside|outside"):
        storage.resolve_inside(str(tmp_path), name)
    with pytest.raises(storage.UnsafePathError):
        storage.resolve_inside("s3://bucket/images/train", name)


def test_resolve_inside_accepts_nested_names_and_follows_inner_links(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"x")
    os.symlink(tmp_path / "sub" / "a.png", tmp_path / "inner-link.png")
    assert storage.resolve_inside(str(tmp_path), "sub/a.png") == str(tmp_path / "sub" / "a.png")
    assert storage.resolve_inside(str(tmp_path), "./inner-link.png").endswith("inner-link.png")
    assert storage.resolve_inside("s3://b/images", "x/y.png") == "s3://b/images/x/y.png"


def test_resolve_inside_rejects_a_symlink_leading_out(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"secret")
    os.symlink(outside / "secret.png", root / "link.png")
    os.symlink(outside, root / "dirlink")
    for name in ("link.png", "dirlink/secret.png"):
        with pytest.raises(storage.UnsafePathError, match="symbolic link"):
            storage.resolve_inside(str(root), name)


def test_reader_rejects_an_escaping_file_name_as_unsafe_path_and_never_reads_it(tmp_path):
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    Image.new("RGB", (16, 24)).save(secret)
    ds = _coco(
        tmp_path / "data",
        [_image(1, "../../outside/secret.png", _skip=True), _image(2)],
        [_person(11, 1), _person(12, 1), _person(13, 2)],
    )
    assert secret.exists()
    record, (rej,) = ds.read(1)
    assert record is None and rej.reason == "unsafe_path" and rej.annotation_id is None
    assert rej.detail.endswith("people=2") and "'..'" in rej.detail
    assert "unsafe_path" in IMAGE_LEVEL_REASONS and "unsafe_path" in REJECT_REASONS
    record, rejections = ds.read(2)
    assert record is not None and not rejections


# --------------------------------------------------------------------------------------------
# Keypoints outside the image: one pure function for preprocessing and inference
# --------------------------------------------------------------------------------------------


def test_keypoints_outside_image_flags_only_labelled_keypoints_beyond_the_margin():
    kps = np.zeros((4, 17, 3), np.float32)
    kps[..., :2] = 10.0
    kps[..., 2] = 2
    kps[1, 3] = (5000, -300, 2)  # far outside: flagged
    kps[2, 3] = (5000, -300, 0)  # unlabelled: ignored
    kps[3, 3] = (110, -20, 1)  # 10 / 20 px outside a 100 x 80 image, margin 25 px: kept
    flags = keypoints_outside_image(kps, height=80, width=100, margin_fraction=0.25)
    assert flags.tolist() == [False, True, False, False]
    assert keypoints_outside_image(kps, height=80, width=100, margin_fraction=0.0).tolist() == [
        False,
        True,
        False,
        True,
    ]
    why = describe_outside_keypoints(kps[1], height=80, width=100, margin_fraction=0.25)
    assert "keypoint 3 at (5000, -300)" in why and "100x80" in why
    assert describe_outside_keypoints(kps[0], height=80, width=100, margin_fraction=0.25) == ""
    with pytest.raises(ValueError, match="margin_fraction"):
        keypoints_outside_image(kps, height=80, width=100, margin_fraction=-1)


def test_outside_image_rejects_is_the_one_rule_with_its_reasons():
    kps = np.full((3, 17, 3), 10.0)
    kps[..., 2] = 2
    kps[1, 5] = (100_010, 10, 2)  # 100,000 px outside a 100 x 80 image
    kps[2, 5] = (100_010, 10, 0)  # unlabelled: ignored
    (rejected,) = outside_image_rejects(kps, height=80, width=100, margin_fraction=0.25)
    assert rejected[0] == 1 and "keypoint 5 at (100010, 10)" in rejected[1]
    assert outside_image_rejects(kps[:1], height=80, width=100, margin_fraction=0.25) == []


def test_a_huge_keypoint_is_out_of_range_not_infinite():
    person = [10.0, 10.0, 2.0] * 17
    person[3] = 1e308  # finite in JSON and float64; float32 would make it inf
    with pytest.raises(ValueError, match=r"person 0, keypoint 1: 1e\+308 is out of range"):
        people_keypoints([person])
    with pytest.raises(ValueError, match="must be finite"):
        people_keypoints([[float("inf")] * 51])
    assert people_keypoints([[10.0, 10.0, 2.0] * 17]).dtype == np.float32


def test_reader_rejects_a_person_with_keypoints_far_outside_and_keeps_the_rest(tmp_path):
    far = _keypoints(6, 8)
    far[0:3] = [5000.0, -300.0, 2.0]
    ds = _coco(tmp_path, [_image(1)], [_person(11, 1, keypoints=far), _person(12, 1)])
    record, (rej,) = ds.read(1)
    assert [p.annotation_id for p in record.people] == [12]
    assert (rej.reason, rej.annotation_id) == (REASON_OUTSIDE_IMAGE, 11)
    assert "(5000, -300)" in rej.detail and REASON_OUTSIDE_IMAGE in REJECT_REASONS
    # The margin is the config's: a generous one keeps the person.
    lenient = CocoPersonDataset(
        ds.annotations_uri, ds.images_uri, split="train", keypoint_margin_fraction=1000.0
    )
    record, rejections = lenient.read(1)
    assert len(record.people) == 2 and not rejections


def test_template_keypoints_go_through_the_readers_validation(tmp_path):
    """Issue 16 finding 3: a string inside a train person's keypoints aborted preprocessing in
    the template pass; now that person is skipped there (and a counted reject in the shards)."""
    from preprocessing.pipeline import _train_keypoints

    text = _keypoints(6, 8)
    text[4] = "abc"
    far = _keypoints(6, 8)
    far[0:3] = [5000.0, -300.0, 2.0]
    ds = _coco(
        tmp_path,
        [_image(1), _image(2, "../escape.png", _skip=True)],
        [
            _person(11, 1, keypoints=text),
            _person(12, 1, keypoints=far),
            _person(13, 1),
            _person(14, 2),  # on an unsafe image: rejected with it
            _person(15, 1, keypoints=None),  # no keypoints: nothing to fit
        ],
    )
    kps = _train_keypoints("ann.json", ds)
    assert kps.shape == (1, 17, 3)
    np.testing.assert_allclose(kps[0].reshape(-1), _keypoints(6, 8))
    record, rejections = ds.read(1)
    assert sorted((r.annotation_id, r.reason) for r in rejections) == [
        (11, "malformed_keypoints"),
        (12, REASON_OUTSIDE_IMAGE),
    ]


def test_template_pass_with_no_valid_person_is_a_preprocess_error(tmp_path):
    from preprocessing.pipeline import PreprocessError, _train_keypoints

    bad = _keypoints(6, 8)
    bad[4] = "abc"
    ds = _coco(tmp_path, [_image(1)], [_person(11, 1, keypoints=bad)])
    with pytest.raises(PreprocessError, match="no person with >= 3 valid labelled keypoints"):
        _train_keypoints("ann.json", ds)


def test_new_config_keys_are_validated():
    assert Config().data.keypoint_margin_fraction == 0.25
    assert Config().eval.max_reject_fraction == 0.1
    with pytest.raises(ConfigError, match="data.keypoint_margin_fraction"):
        Config().with_overrides({"data.keypoint_margin_fraction": -0.1})
    with pytest.raises(ConfigError, match="eval.max_reject_fraction"):
        Config().with_overrides({"eval.max_reject_fraction": 1.5})
    # The margin changes what preprocessing keeps: it is part of the variant key.
    assert (
        Config().preprocess_key()
        != Config().with_overrides({"data.keypoint_margin_fraction": 1.0}).preprocess_key()
    )


# --------------------------------------------------------------------------------------------
# One-line error exits
# --------------------------------------------------------------------------------------------


def _raiser(exc: BaseException):
    def main(argv):
        raise exc

    return main


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConfigError("train.lr: must be > 0"), "configuration error: train.lr: must be > 0"),
        (FileNotFoundError("no such file: data/x.json"), "error: FileNotFoundError: no such file"),
        (ValueError("kp.json: entry 3 names image_id 9"), "error: kp.json: entry 3 names"),
        (ConnectionError("Could not connect to 127.0.0.1:1"), "error: ConnectionError: Could not"),
        (cli.UserError("two\nlines"), "error: two | lines"),
    ],
)
def test_expected_errors_are_one_line_on_stderr_and_exit_2(capsys, monkeypatch, exc, expected):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.run_main(_raiser(exc), []) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1 and "Traceback" not in err


def test_mlflow_and_botocore_errors_are_expected(capsys, monkeypatch):
    from botocore.exceptions import EndpointConnectionError
    from mlflow.exceptions import MlflowException

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    not_found = MlflowException("Registered Model with name=nope not found")
    assert cli.run_main(_raiser(not_found), []) == 2
    assert "Registered Model with name=nope not found" in capsys.readouterr().err
    endpoint = EndpointConnectionError(endpoint_url="http://127.0.0.1:1/bucket")
    assert cli.run_main(_raiser(endpoint), []) == 2
    assert 'endpoint URL: "http://127.0.0.1:1/bucket"' in capsys.readouterr().err


def test_debug_flag_and_env_show_the_traceback(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(FileNotFoundError):
        cli.run_main(_raiser(FileNotFoundError("x")), ["--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError):
        cli.run_main(_raiser(FileNotFoundError("x")), [])


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(TypeError):
        cli.run_main(_raiser(TypeError("a bug")), [])


def test_interrupt_exits_130(capsys):
    assert cli.run_main(_raiser(KeyboardInterrupt()), []) == 130
    assert "interrupted" in capsys.readouterr().err


def test_root_cause_unwraps_ray_train_and_remote_tracebacks():
    from ray.exceptions import RayTaskError, UserCodeException
    from ray.train import ControllerError, WorkerGroupError

    inner = FileNotFoundError("no such file: /data/x.json")
    assert cli.root_cause(WorkerGroupError("rank 1 failed", {1: inner})) is inner
    assert cli.root_cause(ControllerError(inner)) is inner
    wrapped = RayTaskError("fn", "Traceback ...\nFileNotFoundError: no such file", inner)
    assert cli.root_cause(wrapped) is inner
    # Ray Data's UDF wrapper after a process boundary: only the remote traceback has the cause.
    text = (
        "Traceback (most recent call last):\n  File 'x.py', line 3, in udf\n"
        "preprocessing.storage.UnsafePathError: file_name '../x' holds a '..' component\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block."
    )
    udf = RayTaskError("map", text, UserCodeException("UDF failed to process a data block."))
    cause = cli.root_cause(udf)
    assert isinstance(cause, cli.UserError) and "holds a '..' component" in str(cause)
    builtin = RayTaskError("map", "Traceback\nValueError: bad keypoints", UserCodeException("x"))
    assert isinstance(cli.root_cause(builtin), ValueError)
    # Our own exceptions are never unwrapped, even when they chain a cause.
    try:
        try:
            raise KeyError("low level")
        except KeyError as low:
            raise ValueError("image 3 (x.png): cannot be read") from low
    except ValueError as ours:
        assert cli.root_cause(ours) is ours


@pytest.mark.parametrize("script", ["train", "tune", "evaluate", "predict", "preprocess", "serve"])
def test_every_command_turns_a_bad_config_into_exit_2(script, capsys):
    import importlib

    module = importlib.import_module(f"workflows.{script}")
    argv = ["--config", "does/not/exist.yaml"]
    if script == "predict":
        argv += ["--images", "x", "--keypoints", "y.json"]
    assert module.main(argv) == 2
    err = capsys.readouterr().err
    assert "does/not/exist.yaml" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


def test_resume_of_an_unknown_run_fails_at_once_listing_the_runs(tmp_path, capsys):
    from workflows import train
    from workflows.train_driver import RunNotFoundError, check_resumable

    storage_path = tmp_path / "runs"
    (storage_path / "pose2seg-a").mkdir(parents=True)
    (storage_path / "pose2seg-b").mkdir()
    config = Config().with_overrides({"train.storage_path": str(storage_path)})
    check_resumable(config, "pose2seg-a")
    with pytest.raises(RunNotFoundError, match="runs there: pose2seg-a, pose2seg-b"):
        check_resumable(config, "nope")
    # The command: one line, exit 2, before any Ray or training work.
    argv = ["--set", f"train.storage_path={storage_path}", "--resume", "nope"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot resume 'nope'" in err and "pose2seg-b" in err
    empty = Config().with_overrides({"train.storage_path": str(tmp_path / "none")})
    with pytest.raises(RunNotFoundError, match="runs there: none"):
        check_resumable(empty, "nope")


def test_a_new_run_may_not_reuse_a_stored_runs_name(tmp_path, capsys):
    from workflows import train

    (tmp_path / "runs" / "taken").mkdir(parents=True)
    argv = ["--set", f"train.storage_path={tmp_path / 'runs'}", "--set", "train.run_name=taken"]
    assert train.main(argv) == 2
    assert "--resume taken" in capsys.readouterr().err


def test_tune_resume_of_an_unknown_search_fails_at_once(tmp_path, capsys):
    from workflows import tune

    argv = ["--set", f"train.storage_path={tmp_path}", "--resume", "no-such-search"]
    assert tune.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot resume search 'no-such-search'" in err and err.count("\n") == 1


@pytest.fixture
def tracked(tmp_path, monkeypatch) -> Config:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Config().with_overrides({"registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})


def test_a_resumed_run_continues_the_same_mlflow_run(tracked):
    from mlflow import MlflowClient

    from workflows import mlflow_tracking as tracking

    first = tracking.start_run(tracked, run_name="job-1", tags={"pose2seg.kind": "train"})
    tracking.log_metrics(first, {"train_loss": 1.0}, step=1)
    tracking.end_run(first, status="FAILED")
    tracking.start_run(tracked, run_name="job-2", tags={"pose2seg.kind": "train"})
    again = tracking.continue_run(
        tracked, run_name="job-1", extra_filter="tags.`pose2seg.kind` = 'train'"
    )
    assert again is not None and again.run_id == first.run_id
    tracking.log_metrics(again, {"train_loss": 0.5}, step=2)
    tracking.end_run(again)
    client = MlflowClient(tracking_uri=first.tracking_uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["pose2seg.resumes"] == "1"
    history = client.get_metric_history(first.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    runs = client.search_runs([first.experiment_id], "attributes.run_name = 'job-1'")
    assert len(runs) == 1
    assert tracking.continue_run(tracked, run_name="never-ran") is None


def test_runs_of_dead_drivers_are_ended_not_orphaned(tracked):
    import socket
    import subprocess

    from mlflow import MlflowClient

    from workflows import mlflow_tracking as tracking

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tracking.start_run(tracked, run_name="killed", tags={"pose2seg.kind": "train"})
    alive = tracking.start_run(tracked, run_name="running", tags={"pose2seg.kind": "train"})
    client = MlflowClient(tracking_uri=orphan.tracking_uri)
    client.set_tag(orphan.run_id, tracking.DRIVER_TAG, f"{socket.gethostname()}:{dead.pid}")
    assert tracking.end_orphaned_runs(tracked) == [orphan.run_id]
    assert client.get_run(orphan.run_id).info.status == "KILLED"
    assert client.get_run(alive.run_id).info.status == "RUNNING"  # this process holds it
    # --resume of the killed run reopens it.
    again = tracking.continue_run(tracked, run_name="killed")
    assert again.run_id == orphan.run_id
    assert client.get_run(orphan.run_id).info.status == "RUNNING"


# --------------------------------------------------------------------------------------------
# Batch inference rejects and the pyfunc's messages
# --------------------------------------------------------------------------------------------


class _StubPredictor:
    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def predict(self, pixels, keypoints, *, image_id):
        self.calls.append((image_id, len(keypoints)))
        return [{"image_id": image_id, "score": 1.0} for _ in keypoints]


def _png(width: int = 40, height: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def test_predictor_actor_counts_unreadable_images_and_out_of_frame_people(tmp_path):
    from workflows.batch_inference import PredictorActor

    good, broken = tmp_path / "good.png", tmp_path / "broken.png"
    good.write_bytes(_png())
    broken.write_bytes(b"not an image")
    people = np.zeros((2, 17, 3), np.float32)
    people[..., :2], people[..., 2] = 10.0, 2
    people[1, 0] = (5000, -300, 2)
    actor = object.__new__(PredictorActor)
    actor.predictor, actor.margin_fraction = _StubPredictor(), 0.25
    out = actor(
        {
            "image_id": np.array([1, 2, 3]),
            "uri": np.array([str(good), str(broken), str(tmp_path / "absent.png")]),
            "keypoints": np.array([json.dumps(people.tolist())] * 3),
        }
    )
    assert out["image_id"] == [1, 2, 3]
    assert actor.predictor.calls == [(1, 1)]  # only the in-frame person of the good image
    rejects = [r for text in out["rejects"] for r in json.loads(text)]
    assert [(r["image_id"], r["person_index"], r["reason"]) for r in rejects] == [
        (1, 1, "keypoints_outside_image"),
        (2, None, "image_unreadable"),
        (3, None, "image_missing"),
    ]
    assert str(broken) in rejects[1]["uri"] and "cannot be read" in rejects[1]["detail"]
    # The detail names the file, not Pillow's in-memory stream (issue 27).
    assert str(broken) in rejects[1]["detail"] and "BytesIO" not in rejects[1]["detail"]


def test_write_rejects_fails_above_the_configured_fraction(tmp_path):
    from workflows.batch_inference import TooManyRejectsError, image_reject, write_rejects

    rejects = [image_reject(7, "x.png", "image_unreadable", "cannot be read")]
    rejects.append(image_reject(8, "y.png", "keypoints_outside_image", "far", person_index=0))
    path = write_rejects(rejects, str(tmp_path / "a"), num_images=10, max_fraction=0.1)
    assert json.loads(Path(path).read_text()) == rejects
    with pytest.raises(TooManyRejectsError, match=r"1 of 4 images rejected .*rejects\.json"):
        write_rejects(rejects, str(tmp_path / "b"), num_images=4, max_fraction=0.1)
    assert (tmp_path / "b" / "rejects.json").is_file(), "the rejects are written before failing"
    assert issubclass(TooManyRejectsError, cli.UserError)


def test_pyfunc_bad_input_is_an_invalid_parameter_mlflow_exception():
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from workflows.pyfunc_model import Pose2SegPyfunc

    model = Pose2SegPyfunc()
    model.predictor, model.config = _StubPredictor(), Config()
    far = np.zeros((1, 17, 3))
    far[..., 2] = 2
    far[0, 5] = (5000, -300, 2)
    cases = [
        ({"image": [b"junk"], "keypoints": ["[]"], "image_id": [4]}, "image_id 4: image: "),
        ({"image": [_png()], "keypoints": ["[[1, 2]]"], "image_id": [5]}, "N x 51"),
        ({"image": [_png()], "keypoints": [json.dumps(far.tolist())], "image_id": [6]}, "person 0"),
        ({"image": [_png()], "image_id": [7]}, "missing columns ['keypoints']"),
    ]
    for frame, fragment in cases:
        with pytest.raises(MlflowException) as info:
            model.predict(None, pd.DataFrame(frame))
        assert info.value.error_code == "INVALID_PARAMETER_VALUE"
        assert info.value.get_http_status_code() == 400 and fragment in info.value.message
    ok = pd.DataFrame({"image": [_png()], "keypoints": ["[]"], "image_id": [8]})
    assert len(model.predict(None, ok)) == 0


def test_pyfunc_and_serve_give_one_reason_for_an_image_they_cannot_take():
    """``mlflow models serve`` (the pyfunc) and the Serve application answer the same bytes
    with the same one-line reason, which names the field, never Pillow's in-memory stream."""
    import base64

    import pandas as pd
    from mlflow.exceptions import MlflowException

    from workflows.pyfunc_model import Pose2SegPyfunc
    from workflows.serve_request import RequestError, parse_request

    model = Pose2SegPyfunc()
    small = Config().with_overrides({"serve.max_image_pixels": 40 * 30 - 1})
    model.predictor, model.config = _StubPredictor(), small
    cases = [
        (b"GIF89a but not an image", "image: not a decodable image"),
        (_png(40, 30), "image: the image is 40x30 (WxH)"),  # above serve.max_image_pixels
    ]
    for data, fragment in cases:
        frame = pd.DataFrame({"image": [data], "keypoints": ["[]"], "image_id": [4]})
        with pytest.raises(MlflowException) as pyfunc:
            model.predict(None, frame)
        with pytest.raises(RequestError) as served:
            parse_request({"image": base64.b64encode(data).decode()}, limits=small.serve)
        assert pyfunc.value.message == f"image_id 4: {served.value}"
        assert fragment in pyfunc.value.message
        assert "BytesIO" not in pyfunc.value.message and "\n" not in pyfunc.value.message


def test_a_logged_pyfunc_carries_every_project_package_it_imports():
    """The model's ``code_paths`` hold every package the pyfunc imports (transitively), so it
    loads where the project is not installed (``mlflow models serve --env-manager virtualenv``)."""
    from tests.unit.test_layering import project_graph
    from workflows.mlflow_tracking import PYFUNC_CODE_PACKAGES

    graph = project_graph()
    seen, todo = set(), ["workflows.pyfunc_model"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    assert "preprocessing.schema" in seen  # the image decoding and its reasons
    assert {m.split(".")[0] for m in seen} <= set(PYFUNC_CODE_PACKAGES)


def test_a_keypoint_results_file_with_1e308_says_out_of_range():
    from workflows.eval_io import KeypointResultsError, results_keypoints

    gt = {"images": [{"id": 1}]}
    good = [10.0, 10.0, 2.0] * 17
    assert results_keypoints([{"image_id": 1, "keypoints": good}], gt, source="kp.json")[1].shape
    bad = [1e308, *good[1:]]
    with pytest.raises(KeypointResultsError, match=r"entry 0 .*1e\+308 is out of range"):
        results_keypoints([{"image_id": 1, "keypoints": bad}], gt, source="kp.json")
    with pytest.raises(KeypointResultsError, match="finite"):
        results_keypoints([{"image_id": 1, "keypoints": [float("nan"), *good[1:]]}], gt, source="x")
