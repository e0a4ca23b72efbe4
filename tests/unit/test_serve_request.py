"""The Serve application's request validation and deployment options, without Ray running."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'ray[serve]')")

from pose2seg.config import Config, ConfigError  # noqa: E402
from workflows.serve_app import (  # noqa: E402
    RequestError,
    app_builder,
    deployment_options,
    parse_request,
)


def _png_b64(h=20, w=30) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a_valid_request_with_keypoints():
    kp = np.zeros((2, 17, 3))
    kp[..., 2] = 2
    req = parse_request(
        {
            "image": _png_b64(),
            "keypoints": kp.reshape(2, 51).tolist(),
            "image_id": 7,
            "overlay": True,
        }
    )
    assert req.pixels.shape == (20, 30, 3) and req.pixels.flags.writeable
    assert req.keypoints.shape == (2, 17, 3) and req.image_id == 7 and req.overlay
    # 17 x 3 lists are accepted too; no keypoints at all means "detect them".
    assert parse_request({"image": _png_b64(), "keypoints": kp.tolist()}).keypoints.shape == (
        2,
        17,
        3,
    )
    assert parse_request({"image": _png_b64()}).keypoints is None
    assert parse_request({"image": _png_b64(), "keypoints": []}).keypoints.shape == (0, 17, 3)


def test_image_uri_is_read_with_the_given_reader():
    raw = base64.b64decode(_png_b64(5, 6))
    req = parse_request({"image_uri": "s3://b/x.png"}, read_uri=lambda uri: raw)
    assert req.pixels.shape == (5, 6, 3)

    def missing(uri):
        raise FileNotFoundError(f"no such file: {uri}")

    with pytest.raises(RequestError, match=r"image_uri 's3://b/y.png': cannot be read"):
        parse_request({"image_uri": "s3://b/y.png"}, read_uri=missing)


@pytest.mark.parametrize(
    "body,match",
    [
        ([1, 2], "JSON object"),
        ({"image": "x", "colour": "red"}, r"unknown field\(s\) \['colour'\]"),
        ({}, "exactly one of"),
        ({"image": "aGk=", "image_uri": "/x.png"}, "exactly one of"),
        ({"image": "!!not base64!!"}, "not valid base64"),
        ({"image": base64.b64encode(b"hello").decode()}, "not a decodable image"),
        ({"image": 5}, "base64 text"),
        ({"image": "PNG", "image_id": "a"}, "image_id"),
        ({"image": "PNG", "overlay": "yes"}, "overlay"),
        ({"image": "PNG", "keypoints": [[1, 2, 3]]}, r"N x 51 or N x 17 x 3.*\[1, 3\]"),
        ({"image": "PNG", "keypoints": {"a": 1}}, "list of people"),
        ({"image": "PNG", "keypoints": [[1] * 50 + ["x"]]}, "51 numbers"),
        ({"image": "PNG", "keypoints": [[float("nan")] * 51]}, "finite"),
        ({"image": "PNG", "keypoints": [[1, 1, -1] * 17]}, "visibility"),
    ],
)
def test_bad_requests_get_a_one_line_reason(body, match):
    if isinstance(body, dict) and body.get("image") == "PNG":
        body = {**body, "image": _png_b64()}
    with pytest.raises(RequestError, match=match) as info:
        parse_request(body)
    assert "\n" not in str(info.value) and "0x" not in str(info.value)


def test_deployment_options_from_the_serve_keys():
    fixed = deployment_options(
        Config().with_overrides({"serve.num_replicas": 3, "serve.cpus_per_replica": 0.5})
    )
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0}
    assert fixed["max_ongoing_requests"] >= Config().serve.max_batch_size
    auto = deployment_options(
        Config().with_overrides(
            {"serve.num_replicas": 1, "serve.max_replicas": 4, "serve.use_gpu": True}
        )
    )
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"]["min_replicas"] == 1
    assert auto["autoscaling_config"]["max_replicas"] == 4
    assert auto["ray_actor_options"]["num_gpus"] == 1


def test_serve_keys_are_validated():
    with pytest.raises(ConfigError, match=r"serve\.max_replicas"):
        Config().with_overrides({"serve.num_replicas": 3, "serve.max_replicas": 2})
    with pytest.raises(ConfigError, match=r"serve\.route_prefix"):
        Config().with_overrides({"serve.route_prefix": "api"})
    with pytest.raises(ConfigError, match=r"detector\.max_size"):
        Config().with_overrides({"detector.min_size": 800, "detector.max_size": 600})


def test_app_builder_rejects_unknown_args():
    with pytest.raises(ValueError, match="unknown application args"):
        app_builder({"modle": "models:/x@y"})


def test_commands_accept_the_serving_and_detector_options():
    from workflows.evaluate import build_parser as evaluate_parser
    from workflows.predict import build_parser as predict_parser
    from workflows.serve import build_parser as serve_parser
    from workflows.serve import pin_model_version

    args = serve_parser().parse_args(
        ["--model", "models:/p/3", "--detach", "--set", "serve.port=9000"]
    )
    assert args.detach and args.model == "models:/p/3" and args.overrides == ["serve.port=9000"]
    assert evaluate_parser().parse_args(["--with-detector"]).with_detector
    assert evaluate_parser().parse_args(["--keypoints", "detector"]).keypoints == "detector"
    assert predict_parser().parse_args(["--images", "imgs"]).keypoints is None
    # Only an alias is resolved (through the registry); versions, runs and folders pass as given.
    for ref in ("models:/p/3", "runs:/abc/model", "/ckpt/folder"):
        assert pin_model_version(ref, "sqlite:///unused.db") == ref
