"""The Ray Serve application: a registered Pose2Seg model behind an HTTP JSON API.

``POST {route_prefix}`` with a JSON object:

- ``image``: the image file (PNG/JPEG) as base64 text, or ``image_uri``: a path or ``s3://``
  URI the replica can read (exactly one of the two);
- ``keypoints`` (optional): the people's COCO keypoints, a list of people of 51 numbers (or
  17 x [x, y, v]) in the image's pixels; without it the keypoint detector
  (``detector.*`` keys, torchvision's Keypoint R-CNN) finds the people;
- ``image_id`` (optional integer, copied to the answer), ``overlay`` (optional boolean: also
  return a PNG of the masks and skeletons, base64).

The answer: ``image_id``, ``height``, ``width``, ``keypoint_source`` (``request`` or
``detector``), ``people``: one entry per person that could be aligned (``person_index`` = its
position in the keypoint list, ``score``, ``segmentation`` = COCO compressed RLE
``{"size": [H, W], "counts"}``, ``keypoints``: the 51 numbers used), ``unsegmented``: indices of
people without any usable keypoint (a pose-based model cannot place them), ``model`` and
``model_version`` (what the replica serves), ``batch_size`` (how many requests the replica ran
through the model together with this one) and, if asked, ``overlay_png``.

Bad input (not JSON, an unknown field, an undecodable image, an unreadable URI, keypoints of
the wrong shape) is answered 400 with ``{"error": one line}``; the replica keeps serving.
``GET {route_prefix}`` describes the model served.

Requests are batched with ``@serve.batch`` (``serve.max_batch_size``,
``serve.batch_wait_timeout_s``): one forward pass of the model for the batch. Replicas load the
model themselves (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...``, an MLflow
model folder or a checkpoint folder, local or s3://) through
:func:`workflows.batch_inference.resolve_checkpoint_dir`, so nothing large passes through
Serve's controller and a redeploy loads whatever the reference names then.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from pose2seg.config import Config
from pose2seg.skeleton import NUM_KEYPOINTS

logger = logging.getLogger("ray.serve")

REQUEST_FIELDS = ("image", "image_uri", "keypoints", "image_id", "overlay")


class RequestError(ValueError):
    """A request the API cannot answer: the message is the one-line reason sent back (4xx)."""


@dataclass
class SegmentRequest:
    """One validated request."""

    image_id: int
    pixels: np.ndarray  # (H, W, 3) uint8
    keypoints: np.ndarray | None  # (N, 17, 3) float32, or None: detect them
    overlay: bool


def _decode_image(data: bytes, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            pixels = np.array(img.convert("RGB"), dtype=np.uint8)  # writable: torch takes it
    except Exception as exc:  # PIL raises many types for bad bytes (and for decompression bombs)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = re.sub(r"\s*<[^>]*>", "", reason)  # PIL names the BytesIO object
        raise RequestError(f"{where}: the bytes are not a decodable image ({reason})") from None
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise RequestError(f"{where}: the image is empty")
    return pixels


def parse_keypoints(value: Any) -> np.ndarray:
    """JSON people list -> (N, 17, 3) float32; raises RequestError with the reason."""
    from pose2seg.keypoint_checks import people_keypoints

    try:
        return people_keypoints(value)
    except ValueError as exc:
        raise RequestError(f"keypoints: {exc}") from None


def parse_request(body: Any, *, read_uri=None) -> SegmentRequest:
    """Validate a decoded JSON body; ``read_uri(uri) -> bytes`` reads ``image_uri``."""
    if not isinstance(body, dict):
        raise RequestError(
            f"the body must be a JSON object with the fields {list(REQUEST_FIELDS)}, got {type(body).__name__}"
        )
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; the fields are {list(REQUEST_FIELDS)}")
    image_id = body.get("image_id", 0)
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        raise RequestError(f"image_id: expected an integer, got {image_id!r}")
    overlay = body.get("overlay", False)
    if not isinstance(overlay, bool):
        raise RequestError(f"overlay: expected true or false, got {overlay!r}")
    has_image, has_uri = "image" in body, "image_uri" in body
    if has_image == has_uri:
        raise RequestError("give exactly one of 'image' (base64 image bytes) and 'image_uri'")
    if has_image:
        text = body["image"]
        if not isinstance(text, str):
            raise RequestError("image: expected base64 text of a PNG/JPEG file")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("image: not valid base64") from None
        pixels = _decode_image(data, "image")
    else:
        uri = body["image_uri"]
        if not isinstance(uri, str) or not uri:
            raise RequestError("image_uri: expected a path or s3:// URI")
        if read_uri is None:
            from preprocessing.storage import read_bytes as read_uri
        try:
            data = read_uri(uri)
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RequestError(f"image_uri {uri!r}: cannot be read ({reason})") from None
        pixels = _decode_image(data, f"image_uri {uri!r}")
    keypoints = parse_keypoints(body["keypoints"]) if "keypoints" in body else None
    return SegmentRequest(image_id=image_id, pixels=pixels, keypoints=keypoints, overlay=overlay)


def overlay_png(pixels: np.ndarray, people: list[dict[str, Any]], keypoints: np.ndarray) -> str:
    """Base64 PNG of the masks (one colour per person) and the skeletons over the image."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    from preprocessing.visualize import draw_instances

    masks = [mask_utils.decode(p["segmentation"]).astype(bool) for p in people]
    mask_arr = np.stack(masks) if masks else np.zeros((0, *pixels.shape[:2]), bool)
    drawn = draw_instances(pixels, mask_arr, keypoints)
    buf = io.BytesIO()
    Image.fromarray(drawn).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def resolve_model(
    model_ref: str, tracking_uri: str | None, work_dir: str
) -> tuple[str, str | None]:
    """(local checkpoint folder, registry version or None) of a model reference."""
    from workflows.batch_inference import resolve_checkpoint_dir

    version = None
    if model_ref.startswith(("models:/", "runs:/")) and tracking_uri:
        from workflows.mlflow_tracking import client_for

        client = client_for(tracking_uri)
        version = registry_version(client, model_ref)
    return resolve_checkpoint_dir(model_ref, work_dir), version


def registry_version(client, model_ref: str) -> str | None:
    """The version ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names (None otherwise)."""
    if not model_ref.startswith("models:/"):
        return None
    rest = model_ref[len("models:/") :]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return str(client.get_model_version_by_alias(name, alias).version)
    parts = rest.split("/")
    return parts[1] if len(parts) >= 2 and parts[1].isdigit() else None


class Pose2SegServer:
    """One Serve replica: a Predictor (and, on first need, a keypoint detector)."""

    def __init__(self, model_ref: str, config_flat: dict[str, Any], tracking_uri: str | None):
        import torch

        from pose2seg.arch import load_predictor

        self.config = Config.from_flat(config_flat)
        s = self.config.serve
        torch.set_num_threads(max(1, round(s.cpus_per_replica)))
        self.device = "cuda" if s.use_gpu and torch.cuda.is_available() else "cpu"
        self._work = tempfile.TemporaryDirectory(prefix="pose2seg-serve-")
        checkpoint_dir, self.model_version = resolve_model(model_ref, tracking_uri, self._work.name)
        self.model_ref = model_ref
        self.predictor = load_predictor(
            checkpoint_dir, device=self.device, precision=s.mixed_precision
        )
        self.detector = None
        self.segment.set_max_batch_size(s.max_batch_size)
        self.segment.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        logger.info("pose2seg replica serving %s (version %s)", model_ref, self.model_version)

    def _detector(self):
        if self.detector is None:
            from workflows.keypoint_detection import load_keypoint_detector

            self.detector = load_keypoint_detector(self.config, device=self.device)
        return self.detector

    def describe(self) -> dict[str, Any]:
        m = self.predictor.config
        return {
            "model": self.model_ref,
            "model_version": self.model_version,
            "input_size": self.predictor.input_size,
            "roi_size": m.roi_size,
            "mask_threshold": m.mask_threshold,
            "max_batch_size": self.config.serve.max_batch_size,
            "request_fields": list(REQUEST_FIELDS),
            "detector_weights": self.config.detector.weights,
        }

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        if request.method == "GET":
            return JSONResponse(self.describe())
        if request.method != "POST":
            return JSONResponse({"error": "use POST (or GET for the model)"}, status_code=405)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return JSONResponse({"error": f"the body is not JSON: {exc}"}, status_code=400)
        try:
            item = parse_request(body)
            return JSONResponse(await self.segment(item))
        except RequestError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except Exception as exc:  # never a stack trace to the client; the log has it
            logger.exception("pose2seg request failed")
            line = str(exc).splitlines()[0] if str(exc) else ""
            return JSONResponse(
                {"error": f"internal error: {type(exc).__name__}: {line}"}, status_code=500
            )

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def segment(self, items: list[SegmentRequest]) -> list[dict[str, Any]]:
        """Segment a batch of requests with one forward pass; one answer per request."""
        # In a thread: the event loop keeps reading and validating the next requests.
        return await asyncio.to_thread(self.segment_batch, items)

    def segment_batch(self, items: list[SegmentRequest]) -> list[dict[str, Any]]:
        sources = ["request" if it.keypoints is not None else "detector" for it in items]
        missing = [i for i, it in enumerate(items) if it.keypoints is None]
        keypoints: list[np.ndarray] = [
            it.keypoints if it.keypoints is not None else np.zeros((0, NUM_KEYPOINTS, 3))
            for it in items
        ]
        if missing:
            found = self._detector().detect_batch([items[i].pixels for i in missing])
            for i, det in zip(missing, found, strict=True):
                keypoints[i] = det.keypoints
        # Batch positions as image ids: two requests may carry the same image_id.
        results = self.predictor.predict_batch(
            [it.pixels for it in items], keypoints, image_ids=list(range(len(items)))
        )
        by_position: dict[int, list[dict[str, Any]]] = {}
        for r in results:
            by_position.setdefault(int(r["image_id"]), []).append(r)
        answers = []
        for b, (item, kpts) in enumerate(zip(items, keypoints, strict=True)):
            alignable = np.flatnonzero((kpts[..., 2] > 0).any(axis=1))
            masks = by_position.get(b, [])
            if len(masks) != len(alignable):  # the Predictor's contract: one per alignable person
                raise RuntimeError(f"{len(masks)} masks for {len(alignable)} alignable people")
            people = [
                {
                    "person_index": int(index),
                    "score": _json_float(r["score"]),
                    "segmentation": r["segmentation"],
                    "keypoints": [round(float(v), 2) for v in kpts[index].reshape(-1)],
                }
                for index, r in zip(alignable, masks, strict=True)
            ]
            answer = {
                "image_id": item.image_id,
                "height": int(item.pixels.shape[0]),
                "width": int(item.pixels.shape[1]),
                "keypoint_source": sources[b],
                "people": people,
                "unsegmented": [int(i) for i in np.flatnonzero(~(kpts[..., 2] > 0).any(axis=1))],
                "model": self.model_ref,
                "model_version": self.model_version,
                "batch_size": len(items),
            }
            if item.overlay:
                answer["overlay_png"] = overlay_png(item.pixels, people, kpts[alignable])
            answers.append(answer)
        return answers


def deployment_options(config: Config) -> dict[str, Any]:
    """Replica resources and count (or autoscaling) from the ``serve.*`` keys."""
    s = config.serve
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": 1 if s.use_gpu else 0},
        # Enough requests in flight per replica to fill a batch while the last one runs.
        "max_ongoing_requests": max(2 * s.max_batch_size, 4),
    }
    if s.max_replicas:
        options["autoscaling_config"] = {
            "min_replicas": s.num_replicas,
            "initial_replicas": s.num_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = s.num_replicas
    return options


def build_app(config: Config, *, model_ref: str, tracking_uri: str | None = None):
    """The Serve application (``serve.run(build_app(...))``)."""
    deployment = serve.deployment(Pose2SegServer, name="Pose2SegServer")
    return deployment.options(**deployment_options(config)).bind(
        model_ref, config.to_flat(), tracking_uri
    )


def app_builder(args: dict[str, Any]):
    """Entry for Serve config files / KubeRay's RayService (``import_path:
    workflows.serve_app:app_builder``). ``args``: ``config`` (a YAML path, optional), ``set``
    (a list of ``key=value`` overrides, optional), ``model`` (default: the config's
    ``models:/NAME@ALIAS``)."""
    from pose2seg.config import load_config
    from workflows.mlflow_tracking import resolve_tracking_uri

    unknown = sorted(set(args) - {"config", "set", "model"})
    if unknown:
        raise ValueError(f"unknown application args {unknown}; expected config, set, model")
    config = load_config(args.get("config"), list(args.get("set") or []))
    model_ref = args.get("model") or (
        f"models:/{config.registry.model_name}@{config.registry.alias}"
    )
    return build_app(config, model_ref=model_ref, tracking_uri=resolve_tracking_uri(config))
