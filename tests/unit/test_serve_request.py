"""The Serve application's request validation and deployment options, without Ray running."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'ray[serve]')")

from pose2seg.config import Config, ConfigError, ServeConfig  # noqa: E402
from workflows.serve_app import (  # noqa: E402
    RequestError,
    app_builder,
    deployment_options,
    parse_request,
    resolve_image_uri,
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
    roots = ServeConfig(image_roots=["s3://b"])
    read: list[str] = []
    req = parse_request(
        {"image_uri": "s3://b/x.png"}, limits=roots, read_uri=lambda uri: read.append(uri) or raw
    )
    assert req.pixels.shape == (5, 6, 3) and read == ["s3://b/x.png"]

    def missing(uri):
        raise FileNotFoundError(f"no such file: {uri}")

    with pytest.raises(RequestError, match=r"image_uri 's3://b/y.png': cannot be read"):
        parse_request({"image_uri": "s3://b/y.png"}, limits=roots, read_uri=missing)


def _never_read(uri):
    raise AssertionError(f"{uri} must not be read")


def test_image_uri_is_disabled_without_image_roots():
    with pytest.raises(RequestError, match=r"image_uri is disabled.*serve\.image_roots") as info:
        parse_request({"image_uri": "/etc/hostname"}, read_uri=_never_read)
    assert info.value.status == 403


def test_image_uri_stays_inside_the_image_roots(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(base64.b64decode(_png_b64(4, 5)))
    secret = tmp_path / "secret.png"
    secret.write_bytes(base64.b64decode(_png_b64(6, 7)))
    (root / "link.png").symlink_to(secret)
    limits = ServeConfig(image_roots=[str(root)])
    # Inside: an absolute path below the root, or a name relative to it.
    for uri in (str(root / "sub" / "a.png"), "sub/a.png"):
        assert parse_request({"image_uri": uri}, limits=limits).pixels.shape == (4, 5, 3)
    refused = {
        str(secret): "outside serve.image_roots",
        f"{root}/../secret.png": "'..' component",
        "../secret.png": "'..' component",
        str(root / "link.png"): "symbolic link",
        "s3://other/x.png": "outside serve.image_roots",
    }
    for uri, match in refused.items():
        with pytest.raises(RequestError, match=match) as info:
            parse_request({"image_uri": uri}, limits=limits, read_uri=_never_read)
        assert info.value.status == 403 and "\n" not in str(info.value)
    # The same rule for s3:// roots: below the prefix only.
    assert resolve_image_uri("s3://b/data/x.png", ["s3://b/data/"]) == "s3://b/data/x.png"
    with pytest.raises(RequestError, match="'..' component"):
        resolve_image_uri("s3://b/data/../x.png", ["s3://b/data"])


def _png_header_bytes(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (the pixel data is a stub: a size
    check that decodes would fail on it, one that reads the header does not)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_an_image_above_max_image_pixels_is_413_before_decoding():
    big = base64.b64encode(_png_header_bytes(13000, 13000)).decode()
    with pytest.raises(RequestError, match=r"13000x13000.*serve\.max_image_pixels") as info:
        parse_request({"image": big})
    assert info.value.status == 413 and "\n" not in str(info.value)
    small = ServeConfig(max_image_pixels=20 * 30 - 1)
    with pytest.raises(RequestError, match="600 pixels") as info:
        parse_request({"image": _png_b64(20, 30)}, limits=small)
    assert info.value.status == 413
    assert parse_request({"image": _png_b64(20, 30)}, limits=ServeConfig(max_image_pixels=600))


def test_more_people_than_max_people_is_413():
    people = np.zeros((3, 51)).tolist()
    with pytest.raises(RequestError, match=r"3 people, more than serve\.max_people=2") as info:
        parse_request({"image": _png_b64(), "keypoints": people}, limits=ServeConfig(max_people=2))
    assert info.value.status == 413
    ok = parse_request({"image": _png_b64(), "keypoints": people}, limits=ServeConfig(max_people=3))
    assert ok.keypoints.shape == (3, 17, 3)


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
        ({"image": "PNG", "keypoints": [[1e308, 5, 2] * 17]}, "1e.308 is out of range"),
        ({"image": base64.b64encode(b"hello").decode()}, r"cannot identify image file image\)"),
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


@pytest.mark.parametrize("kind", ["folder", "version", "alias"])
def test_serve_with_a_model_that_does_not_exist_is_one_line_before_ray_starts(
    kind, tmp_path, capsys, monkeypatch
):
    from workflows import cli, serve

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for a model that does not exist")

    monkeypatch.setattr(cli, "init_ray", no_ray)
    monkeypatch.delenv("POSE2SEG_DEBUG", raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = {
        "folder": str(tmp_path / "no-such-checkpoint"),
        "version": "models:/pose2seg/42",
        "alias": "models:/pose2seg@champion",
    }[kind]
    code = serve.main(["--model", model, "--set", f"registry.tracking_uri={store}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    # (A fresh SQLite store logs its table creation first: MLflow's lines, not ours.)
    assert f"model {model!r} cannot be served" in err[-1], err
    assert not any("Traceback" in line or "Deploying" in line for line in err), err
