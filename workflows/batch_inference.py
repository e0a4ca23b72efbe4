"""Batch inference with Ray Data, shared by evaluate.py and predict.py.

A model reference (``models:/name@alias``, ``runs:/id/model``, a local MLflow model folder or a
checkpoint folder) is resolved once on the driver into the checkpoint's files, put in Ray's
object store (so actors on any node can load it), and served by a pool of Ray Data actors, each
holding one :class:`pose2seg.inference.Predictor`. Inputs are (image id, image URI, keypoints)
items; outputs are COCO result dicts in the original image frame.

Bad inputs do not stop the job: an image that cannot be read or decoded, or whose file name
leaves the images folder, is an image-level reject; a person with a labelled keypoint far
outside the image (:mod:`pose2seg.keypoint_checks`) is a person-level reject and gets no mask.
Rejects come back in ``stats["rejects"]`` (dicts with ``image_id``, ``person_index`` (None for
an image), ``uri``, ``reason``, ``detail``); the commands write them to ``rejects.json`` and
fail (:class:`TooManyRejectsError`) when the rejected images exceed ``eval.max_reject_fraction``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from pose2seg.config import Config
from pose2seg.skeleton import NUM_KEYPOINTS
from workflows.cli import UserError

REJECTS_FILE = "rejects.json"


class TooManyRejectsError(UserError):
    """More images were rejected than ``eval.max_reject_fraction`` allows."""


def image_reject(
    image_id: int, uri: str, reason: str, detail: str, person_index: int | None = None
) -> dict[str, Any]:
    """One entry of ``rejects.json``."""
    return {
        "image_id": int(image_id),
        "person_index": person_index,
        "uri": str(uri),
        "reason": reason,
        "detail": detail,
    }


def safe_image_uri(images_uri: str, file_name: str) -> tuple[str, str]:
    """``(uri, "")`` for a file name inside ``images_uri``, else ``("", why)`` (unsafe_path)."""
    from preprocessing.storage import UnsafePathError, resolve_inside

    try:
        return resolve_inside(images_uri, file_name), ""
    except UnsafePathError as exc:
        return "", str(exc)


def write_rejects(
    rejects: list[dict[str, Any]], out_dir: str, *, num_images: int, max_fraction: float
) -> str:
    """Write ``rejects.json`` (always, possibly empty) and fail when the rejected images exceed
    ``max_fraction`` of ``num_images``; returns the file's path."""
    path = os.path.join(out_dir, REJECTS_FILE)
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(rejects, fh, indent=1)
    images = {r["image_id"] for r in rejects if r.get("person_index") is None}
    fraction = len(images) / num_images if num_images else 0.0
    if fraction > max_fraction:
        reasons: dict[str, int] = {}
        for r in rejects:
            if r.get("person_index") is None:
                reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        raise TooManyRejectsError(
            f"{len(images)} of {num_images} images rejected ({fraction:.3f} > "
            f"eval.max_reject_fraction={max_fraction}; {reasons}); see {path}"
        )
    return path


def resolve_checkpoint_dir(model_ref: str, work_dir: str) -> str:
    """A local checkpoint folder for ``model_ref`` (downloaded from MLflow when needed)."""
    from pose2seg.checkpoint import CONFIG_FILE

    if os.path.isdir(model_ref):
        if os.path.isfile(os.path.join(model_ref, CONFIG_FILE)):
            return model_ref
        candidate = os.path.join(model_ref, "artifacts", "checkpoint")
        if os.path.isfile(os.path.join(candidate, CONFIG_FILE)):
            return candidate
        raise FileNotFoundError(
            f"{model_ref!r} is neither a checkpoint folder nor an MLflow pyfunc model folder"
        )
    if model_ref.startswith(("models:/", "runs:/")) or "://" in model_ref:
        import mlflow.artifacts

        local = mlflow.artifacts.download_artifacts(artifact_uri=model_ref, dst_path=work_dir)
        return resolve_checkpoint_dir(local, work_dir)
    raise FileNotFoundError(
        f"model {model_ref!r}: no such folder, and not a models:/ or runs:/ URI"
    )


def pack_dir(directory: str) -> dict[str, bytes]:
    """The checkpoint's files as bytes (without the optimiser state, which inference never needs)."""
    from pose2seg.checkpoint import TRAINING_FILE

    files = {}
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and name != TRAINING_FILE:
            with open(path, "rb") as fh:
                files[name] = fh.read()
    return files


def unpack_dir(files: dict[str, bytes]) -> str:
    directory = tempfile.mkdtemp(prefix="pose2seg-ckpt-")
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as fh:
            fh.write(data)
    return directory


class PredictorActor:
    """A Ray Data actor: loads the checkpoint once, predicts batches of images."""

    def __init__(
        self,
        checkpoint_ref: list,
        use_gpu: bool = False,
        num_threads: int = 1,
        margin_fraction: float = 0.25,
        precision: str = "fp32",
    ):
        import ray
        import torch

        from pose2seg.arch import load_predictor

        torch.set_num_threads(max(1, num_threads))
        self.margin_fraction = float(margin_fraction)
        # The files travel once through the object store (wrapped in a list so Ray hands the
        # reference over instead of inlining megabytes of weights into the actor's arguments).
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.predictor = load_predictor(
            unpack_dir(ray.get(checkpoint_ref[0])), device=device, precision=precision
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from pose2seg.keypoint_checks import outside_image_rejects
        from preprocessing.schema import ImageDecodeError, decode_image, image_error_text
        from preprocessing.storage import read_bytes

        out_ids, out_results, out_rejects = [], [], []
        for image_id, uri, kpts_json in zip(
            batch["image_id"], batch["uri"], batch["keypoints"], strict=True
        ):
            image_id, uri = int(image_id), str(uri)
            rejects: list[dict[str, Any]] = []
            results: list[dict[str, Any]] = []
            pixels = None
            try:
                pixels = decode_image(read_bytes(uri), name=uri)
            except FileNotFoundError as exc:
                rejects.append(image_reject(image_id, uri, "image_missing", str(exc)))
            except ImageDecodeError as exc:
                detail = f"cannot be read: {exc}"
                rejects.append(image_reject(image_id, uri, "image_unreadable", detail))
            except Exception as exc:  # OS/S3 errors of one unreadable file
                detail = f"cannot be read: {type(exc).__name__}: {image_error_text(exc, uri)}"
                rejects.append(image_reject(image_id, uri, "image_unreadable", detail))
            if pixels is not None:
                keypoints = np.asarray(json.loads(str(kpts_json)), dtype=np.float32)
                keypoints = keypoints.reshape(-1, NUM_KEYPOINTS, 3)
                rejected = outside_image_rejects(
                    keypoints,
                    height=pixels.shape[0],
                    width=pixels.shape[1],
                    margin_fraction=self.margin_fraction,
                )
                for index, why in rejected:
                    rejects.append(
                        image_reject(image_id, uri, "keypoints_outside_image", why, index)
                    )
                dropped = {index for index, _ in rejected}
                keep = [i for i in range(len(keypoints)) if i not in dropped]
                if keep:
                    results = self.predictor.predict(pixels, keypoints[keep], image_id=image_id)
            out_ids.append(image_id)
            out_results.append(json.dumps(results))
            out_rejects.append(json.dumps(rejects))
        return {"image_id": out_ids, "results": out_results, "rejects": out_rejects}


@dataclass
class InferenceItem:
    image_id: int
    uri: str  # "" when the file name was unsafe: the item is rejected, never read
    keypoints: np.ndarray  # (N, 17, 3) original frame
    reject_detail: str = ""  # why ``uri`` is empty (an unsafe_path reject)


def run_batch_inference(
    items: list[InferenceItem],
    *,
    model_ref: str,
    config: Config,
    num_actors: int = 1,
    use_gpu: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Predict every item with a pool of Ray Data actors; returns (COCO results, stats).

    ``stats["rejects"]``: the rejected images and people (see the module docstring); the
    caller writes them (:func:`write_rejects`)."""
    import time

    import ray

    if model_ref.startswith(("models:/", "runs:/")):
        from workflows.mlflow_tracking import client_for, resolve_tracking_uri

        client_for(resolve_tracking_uri(config))
    with tempfile.TemporaryDirectory() as work:
        files = pack_dir(resolve_checkpoint_dir(model_ref, work))
    rejects = [
        image_reject(it.image_id, "", "unsafe_path", it.reject_detail) for it in items if not it.uri
    ]
    readable = [it for it in items if it.uri]
    t0 = time.time()
    cpus = 1.0 if use_gpu else max(0.25, config.train.cpus_per_worker)
    predicted: list[dict[str, Any]] = []
    if readable:
        ds = ray.data.from_items(
            [
                {
                    "image_id": it.image_id,
                    "uri": it.uri,
                    "keypoints": json.dumps(np.asarray(it.keypoints).tolist()),
                }
                for it in readable
            ]
        )
        predicted = ds.map_batches(
            PredictorActor,
            fn_constructor_kwargs={
                "checkpoint_ref": [ray.put(files)],
                "use_gpu": use_gpu,
                "num_threads": max(1, int(cpus)),
                "margin_fraction": config.data.keypoint_margin_fraction,
                "precision": config.eval.mixed_precision,
            },
            batch_size=config.eval.batch_size,
            compute=ray.data.ActorPoolStrategy(size=num_actors),  # (Ray 2.51+: not concurrency=)
            num_cpus=cpus,
            num_gpus=1 if use_gpu else 0,
            batch_format="numpy",
        ).take_all()
    seconds = time.time() - t0
    results = [r for row in predicted for r in json.loads(row["results"])]
    rejects += [r for row in predicted for r in json.loads(row["rejects"])]
    rejects.sort(
        key=lambda r: (r["image_id"], -1 if r["person_index"] is None else r["person_index"])
    )
    stats = {
        "images": len(items),
        "people": int(sum(len(it.keypoints) for it in items)),
        "seconds": seconds,
        "images_per_s": len(items) / max(seconds, 1e-9),
        "people_per_s": sum(len(it.keypoints) for it in items) / max(seconds, 1e-9),
        "rejected_images": len({r["image_id"] for r in rejects if r["person_index"] is None}),
        "rejected_people": sum(1 for r in rejects if r["person_index"] is not None),
        "rejects": rejects,
    }
    return results, stats
