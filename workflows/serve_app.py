"""The Ray Serve application: a registered Pose2Seg model behind an HTTP JSON API.

``POST {route_prefix}`` with a JSON object:

- ``image``: the image file (PNG/JPEG) as base64 text, or ``image_uri``: a path or ``s3://``
  URI below one of the configured ``serve.image_roots`` (or a name relative to the first of
  them); exactly one of the two. With no roots configured (the default) ``image_uri`` is
  refused (403); a ``..`` component, a path outside the roots or a symbolic link out of them
  is refused (403) by the same check as the dataset reader's
  (:func:`preprocessing.storage.resolve_inside`);
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

A person with a labelled keypoint far outside the image (:mod:`pose2seg.keypoint_checks`, the
rule batch inference applies) gets no mask: the answer's ``rejected`` lists ``person_index``,
``reason`` and ``detail`` for each.

Bad input (not JSON, an unknown field, an undecodable image, an unreadable URI, keypoints of
the wrong shape or out of range) is answered 400 with ``{"error": one line}``; an image of
more than ``serve.max_image_pixels`` pixels (read from its header, before decoding) or more
than ``serve.max_people`` people is answered 413; an ``image_uri`` outside
``serve.image_roots`` 403. The replica keeps serving.
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
import io
import json
import logging
import math
import tempfile
from typing import Any

import numpy as np
from ray import serve

from pose2seg.config import Config
from pose2seg.skeleton import NUM_KEYPOINTS

# The request checks (workflows/serve_request.py), re-exported: tests and users import them here.
from workflows.serve_request import (  # noqa: F401
    REQUEST_FIELDS,
    RequestError,
    SegmentRequest,
    parse_keypoints,
    parse_request,
    resolve_image_uri,
)

logger = logging.getLogger("ray.serve")


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


class ModelNotFoundError(FileNotFoundError):
    """``serve.py --model`` names no model that exists (exit code 2, before deploying)."""


def check_model_ref(model_ref: str, tracking_uri: str | None) -> None:
    """Raise :class:`ModelNotFoundError` (one line) unless ``model_ref`` names an existing
    model: a registered version or alias, a run, an ``s3://`` prefix or a local checkpoint or
    MLflow model folder. Cheap (registry look-ups, no download): ``serve.py`` calls it before
    it starts Ray and deploys, so a typo fails in seconds instead of in a replica."""
    from workflows.batch_inference import resolve_checkpoint_dir

    try:
        if model_ref.startswith(("models:/", "runs:/")):
            from workflows.mlflow_tracking import client_for, redact_uri

            where = f" in the tracking store {redact_uri(tracking_uri or '')}"
            client = client_for(tracking_uri) if tracking_uri else None
            if client is None:
                raise ModelNotFoundError("no tracking store to look it up in")
            _look_up(client, model_ref)
        elif model_ref.startswith("s3://"):
            from preprocessing.storage import exists

            where = ""
            if not exists(model_ref):
                raise ModelNotFoundError("no such s3:// prefix")
        elif "://" in model_ref:
            return  # another artifact URI: MLflow resolves it in the replica
        else:
            where = ""
            resolve_checkpoint_dir(model_ref, "")  # a local folder: no download happens
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"model {model_ref!r} cannot be served: {exc}{where}") from None
    except Exception as exc:  # MlflowException (RESOURCE_DOES_NOT_EXIST), FileNotFoundError
        from workflows.cli import one_line

        raise ModelNotFoundError(
            f"model {model_ref!r} cannot be served: {one_line(exc, limit=300)}"
        ) from None


def _look_up(client, model_ref: str) -> None:
    if model_ref.startswith("runs:/"):
        client.get_run(model_ref[len("runs:/") :].split("/")[0])
        return
    rest = model_ref[len("models:/") :]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        client.get_model_version_by_alias(name, alias)
        return
    name, _, version = rest.partition("/")
    if version.isdigit():
        client.get_model_version(name, version)
    else:
        client.get_registered_model(name)


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
            "max_image_pixels": self.config.serve.max_image_pixels,
            "max_people": self.config.serve.max_people,
            "image_uri_enabled": bool(self.config.serve.image_roots),
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
            item = parse_request(body, limits=self.config.serve)
            return JSONResponse(await self.segment(item))
        except RequestError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
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
        from pose2seg.keypoint_checks import REASON_OUTSIDE_IMAGE, outside_image_rejects

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
        # The batch path's rule: a person with a keypoint far outside the image gets no mask.
        margin = self.config.data.keypoint_margin_fraction
        rejected: list[list[tuple[int, str]]] = []
        model_keypoints: list[np.ndarray] = []
        for it, kpts in zip(items, keypoints, strict=True):
            h, w = it.pixels.shape[:2]
            out = outside_image_rejects(kpts, height=h, width=w, margin_fraction=margin)
            rejected.append(out)
            hidden = kpts.copy()
            hidden[[i for i, _ in out], :, 2] = 0  # no labelled keypoint: no mask, no index
            model_keypoints.append(hidden)
        # Batch positions as image ids: two requests may carry the same image_id.
        results = self.predictor.predict_batch(
            [it.pixels for it in items], model_keypoints, image_ids=list(range(len(items)))
        )
        by_position: dict[int, list[dict[str, Any]]] = {}
        for r in results:
            by_position.setdefault(int(r["image_id"]), []).append(r)
        answers = []
        for b, (item, kpts) in enumerate(zip(items, keypoints, strict=True)):
            labelled = (model_keypoints[b][..., 2] > 0).any(axis=1)
            alignable = np.flatnonzero(labelled)
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
                "rejected": [
                    {"person_index": i, "reason": REASON_OUTSIDE_IMAGE, "detail": why}
                    for i, why in rejected[b]
                ],
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
