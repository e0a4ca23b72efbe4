"""Online inference: the Ray Serve application on the session's local Ray (real HTTP requests,
batching, bad input, the keypoint detector, a redeploy picking up a new champion) and
`mlflow models serve` answering one request. Serve is shut down at the end of the module."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration
pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'ray[serve]')")


def post(url: str, body, *, raw: bytes | None = None, timeout: float = 120):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str):
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def sample(trained):
    """The first val image of the tiny run with people: its path, bytes and GT keypoints."""
    from workflows.eval_io import gt_keypoints, load_gt, split_paths

    config, _ = trained
    annotations, images = split_paths(config, "val")
    gt = load_gt(annotations)
    kps = gt_keypoints(gt)
    im = next(im for im in gt["images"] if len(kps[int(im["id"])]) >= 2)
    path = os.path.join(images, im["file_name"])
    return {
        "image_id": int(im["id"]),
        "path": path,
        "b64": base64.b64encode(Path(path).read_bytes()).decode(),
        "keypoints": kps[int(im["id"])],
    }


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    """The champion deployed with Ray Serve on a free loopback port (0.25 CPU per replica)."""
    import torch
    from ray import serve

    from pose2seg.keypoint_detector import build_keypoint_rcnn
    from workflows.eval_io import split_paths
    from workflows.serve import run_serve

    config, _ = trained
    tmp = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    # Random Keypoint R-CNN weights written to a local file: the detector path, never downloaded.
    weights = tmp / "kprcnn.pth"
    torch.save(build_keypoint_rcnn(min_size=96, max_size=128).state_dict(), weights)
    config = config.with_overrides(
        {
            "serve.port": free_port(),
            "serve.cpus_per_replica": 0.25,
            "serve.max_batch_size": 4,
            # Long enough for two concurrent requests from this client to meet in one batch.
            "serve.batch_wait_timeout_s": 1.0,
            "serve.app_name": "pose2seg-test",
            "detector.weights": str(weights),
            "detector.min_size": 96,
            "detector.max_size": 128,
            "detector.person_score_threshold": 0.0,
            "detector.max_people": 3,
            # image_uri may read the val images only; the tiny images are 96 x 96.
            "serve.image_roots": [split_paths(config, "val")[1]],
            "serve.max_image_pixels": 100 * 100,
            "serve.max_people": 5,
        }
    )
    model_ref = f"models:/{config.registry.model_name}@{config.registry.alias}"
    try:
        info = run_serve(config, model_ref=model_ref)
        yield config, info
    finally:
        serve.shutdown()


def test_masks_equal_evaluates_for_the_same_image_and_keypoints(served, sample):
    from workflows.batch_inference import InferenceItem, run_batch_inference

    config, info = served
    status, out = post(
        info["url"],
        {
            "image": sample["b64"],
            "keypoints": sample["keypoints"].reshape(-1, 51).tolist(),
            "image_id": sample["image_id"],
        },
    )
    assert status == 200, out
    assert out["keypoint_source"] == "request" and out["image_id"] == sample["image_id"]
    assert out["model"] == f"models:/{config.registry.model_name}/1"
    assert out["model_version"] == "1"
    # evaluate.py's path: Ray Data batch inference with the same model, image and keypoints.
    expected, _ = run_batch_inference(
        [InferenceItem(sample["image_id"], sample["path"], sample["keypoints"])],
        model_ref=info["model"],
        config=config,
    )
    assert len(out["people"]) == len(expected) == len(sample["keypoints"])
    for person, ref in zip(out["people"], expected, strict=True):
        assert person["segmentation"] == ref["segmentation"]
        assert person["score"] == pytest.approx(ref["score"], abs=1e-6)
    # The same image read by the replica from its path gives the same masks.
    status, by_uri = post(
        info["url"],
        {"image_uri": sample["path"], "keypoints": sample["keypoints"].tolist()},
    )
    assert status == 200
    assert [p["segmentation"] for p in by_uri["people"]] == [
        p["segmentation"] for p in out["people"]
    ]


def test_two_concurrent_requests_are_served_in_one_batch(served, sample):
    _, info = served
    body = {"image": sample["b64"], "keypoints": sample["keypoints"].reshape(-1, 51).tolist()}
    alone = post(info["url"], {**body, "image_id": 0})[1]
    answers: dict[int, tuple] = {}
    threads = [
        threading.Thread(
            target=lambda i=i: answers.__setitem__(i, post(info["url"], {**body, "image_id": i}))
        )
        for i in (1, 2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [answers[i][0] for i in (1, 2)] == [200, 200]
    assert [answers[i][1]["batch_size"] for i in (1, 2)] == [2, 2]
    assert [answers[i][1]["image_id"] for i in (1, 2)] == [1, 2]  # each answer to its request
    assert alone["batch_size"] == 1
    for i in (1, 2):
        masks = [p["segmentation"] for p in answers[i][1]["people"]]
        assert masks == [p["segmentation"] for p in alone["people"]]


@pytest.mark.parametrize(
    "body,raw,match",
    [
        (None, b"{not json", "not JSON"),
        ({"image": "IMG", "mask_colour": "red"}, None, "unknown field"),
        ({"image": base64.b64encode(b"GIF?no").decode()}, None, "not a decodable image"),
        ({"image": "@@@"}, None, "not valid base64"),
        ({"image_uri": "/nonexistent/pose2seg/x.png"}, None, "outside serve.image_roots"),
        ({"image": "IMG", "keypoints": [[1, 2, 3, 4]]}, None, "N x 51 or N x 17 x 3"),
        ({"image": "BIG"}, None, "serve.max_image_pixels"),
        ({"image": "IMG", "keypoints": [[0] * 51] * 6}, None, "serve.max_people=5"),
        ({"image": "IMG", "keypoints": [[1e308, 1, 2] * 17]}, None, "out of range"),
    ],
    ids=[
        "not-json",
        "unknown-field",
        "undecodable",
        "bad-base64",
        "uri-outside-roots",
        "kpt-shape",
        "too-many-pixels",
        "too-many-people",
        "kpt-out-of-range",
    ],
)
def test_bad_input_is_a_4xx_with_one_line_and_the_replica_keeps_serving(
    served, sample, body, raw, match
):
    _, info = served
    if body is not None and body.get("image") == "IMG":
        body = {**body, "image": sample["b64"]}
    if body is not None and body.get("image") == "BIG":  # 101 x 100 px > serve.max_image_pixels
        body = {**body, "image": _png_b64(100, 101)}
    status, out = post(info["url"], body, raw=raw)
    assert 400 <= status < 500, out
    assert set(out) == {"error"} and match in out["error"]
    assert "\n" not in out["error"] and "Traceback" not in out["error"]
    status, ok = post(info["url"], {"image": sample["b64"], "keypoints": []})
    assert status == 200 and ok["people"] == []


def _png_b64(height: int, width: int) -> str:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a_keypoint_far_outside_is_rejected_as_batch_inference_rejects_it(served, sample):
    from workflows.batch_inference import InferenceItem, run_batch_inference

    config, info = served
    keypoints = sample["keypoints"].copy()
    keypoints[0, 0] = (100_000 + keypoints[0, 0, 0], keypoints[0, 0, 1], 2)
    status, out = post(info["url"], {"image": sample["b64"], "keypoints": keypoints.tolist()})
    assert status == 200, out
    assert [r["person_index"] for r in out["rejected"]] == [0]
    assert out["rejected"][0]["reason"] == "keypoints_outside_image"
    assert [p["person_index"] for p in out["people"]] == list(range(1, len(keypoints)))
    # The batch path (evaluate.py / predict.py) rejects the same person and segments the rest
    # the same way.
    expected, stats = run_batch_inference(
        [InferenceItem(sample["image_id"], sample["path"], keypoints)],
        model_ref=info["model"],
        config=config,
    )
    assert [(r["person_index"], r["reason"]) for r in stats["rejects"]] == [
        (0, "keypoints_outside_image")
    ]
    assert [p["segmentation"] for p in out["people"]] == [r["segmentation"] for r in expected]


def test_an_image_alone_goes_through_the_keypoint_detector(served, sample):
    import io

    from PIL import Image

    config, info = served
    status, out = post(info["url"], {"image": sample["b64"], "overlay": True})
    assert status == 200, out
    assert out["keypoint_source"] == "detector"
    found = len(out["people"]) + len(out["unsegmented"])
    # Random weights: a few low-score "people", never none and never above the cap.
    assert found >= 1 and found <= config.detector.max_people
    for person in out["people"]:
        assert len(person["keypoints"]) == 51
        assert person["segmentation"]["size"] == [out["height"], out["width"]]
    overlay = Image.open(io.BytesIO(base64.b64decode(out["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == (out["width"], out["height"])
    assert get(info["url"])["detector_weights"] == config.detector.weights


def test_a_redeploy_picks_up_a_new_champion(served, trained):
    from mlflow import MlflowClient

    from workflows.serve import run_serve

    config, info = served
    name, alias = config.registry.model_name, config.registry.alias
    client = MlflowClient(tracking_uri=config.registry.tracking_uri)
    first = client.get_model_version_by_alias(name, alias)
    # A "new" version (same weights, which is all this test needs) becomes the champion.
    second = client.create_model_version(name, first.source, run_id=first.run_id)
    client.set_registered_model_alias(name, alias, second.version)
    try:
        assert get(info["url"])["model_version"] == str(first.version)  # still the old one
        again = run_serve(config, model_ref=f"models:/{name}@{alias}")
        assert again["model"] == f"models:/{name}/{second.version}"
        assert get(info["url"])["model_version"] == str(second.version)
    finally:
        client.set_registered_model_alias(name, alias, first.version)


def test_mlflow_models_serve_answers_one_request(trained, sample, tmp_path):
    config, _ = trained
    port = free_port()
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # uvicorn
    env["MLFLOW_TRACKING_URI"] = config.registry.tracking_uri
    log = open(tmp_path / "mlflow-serve.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "models", "serve",
            "-m", f"models:/{config.registry.model_name}@{config.registry.alias}",
            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its uvicorn children stop with it (process group = its PID)
    )  # fmt: skip
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(
                        f"mlflow models serve did not start: {(tmp_path / 'mlflow-serve.log').read_text()[-2000:]}"
                    )
                time.sleep(1)
        payload = {
            "dataframe_split": {
                "columns": ["image", "keypoints", "image_id"],
                "data": [
                    [sample["b64"], json.dumps(sample["keypoints"].tolist()), sample["image_id"]]
                ],
            }
        }
        status, out = post(f"http://127.0.0.1:{port}/invocations", payload)
        assert status == 200, out
        rows = out["predictions"]
        assert len(rows) == len(sample["keypoints"])
        assert {r["image_id"] for r in rows} == {sample["image_id"]}
        assert all(json.loads(r["segmentation"])["counts"] for r in rows)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
