"""Batch inference with Ray Data, shared by evaluate.py and predict.py.

A model reference (``models:/name@alias``, ``runs:/id/model``, a local MLflow model folder or a
checkpoint folder) is resolved once on the driver into the checkpoint's files, put in Ray's
object store (so actors on any node can load it), and served by a pool of Ray Data actors, each
holding one :class:`pose2seg.inference.Predictor`. Inputs are (image id, image URI, keypoints)
items; outputs are COCO result dicts in the original image frame.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from pose2seg.config import Config


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

    def __init__(self, checkpoint_ref: list, use_gpu: bool = False, num_threads: int = 1):
        import ray
        import torch

        from pose2seg.checkpoint import load_checkpoint
        from pose2seg.inference import Predictor
        from pose2seg.model import build_model

        torch.set_num_threads(max(1, num_threads))
        # The files travel once through the object store (wrapped in a list so Ray hands the
        # reference over instead of inlining megabytes of weights into the actor's arguments).
        loaded = load_checkpoint(unpack_dir(ray.get(checkpoint_ref[0])))
        model = build_model(loaded.config.model)
        model.load_state_dict(loaded.model_state)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.predictor = Predictor(
            model,
            loaded.templates,
            loaded.config.model,
            device=device,
            input_size=loaded.config.data.input_size,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from preprocessing.schema import decode_image
        from preprocessing.storage import read_bytes

        out_ids, out_results = [], []
        for image_id, uri, kpts_json in zip(
            batch["image_id"], batch["uri"], batch["keypoints"], strict=True
        ):
            try:
                pixels = decode_image(read_bytes(str(uri)))
            except Exception as exc:
                raise ValueError(f"image {int(image_id)} ({uri}): cannot be read: {exc}") from exc
            keypoints = np.asarray(json.loads(str(kpts_json)), dtype=np.float32).reshape(-1, 17, 3)
            results = (
                self.predictor.predict(pixels, keypoints, image_id=int(image_id))
                if len(keypoints)
                else []
            )
            out_ids.append(int(image_id))
            out_results.append(json.dumps(results))
        return {"image_id": out_ids, "results": out_results}


@dataclass
class InferenceItem:
    image_id: int
    uri: str
    keypoints: np.ndarray  # (N, 17, 3) original frame


def run_batch_inference(
    items: list[InferenceItem],
    *,
    model_ref: str,
    config: Config,
    num_actors: int = 1,
    use_gpu: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Predict every item with a pool of Ray Data actors; returns (COCO results, stats)."""
    import time

    import ray

    if model_ref.startswith(("models:/", "runs:/")):
        from workflows.mlflow_tracking import client_for, resolve_tracking_uri

        client_for(resolve_tracking_uri(config))
    with tempfile.TemporaryDirectory() as work:
        files = pack_dir(resolve_checkpoint_dir(model_ref, work))
    ds = ray.data.from_items(
        [
            {
                "image_id": it.image_id,
                "uri": it.uri,
                "keypoints": json.dumps(np.asarray(it.keypoints).tolist()),
            }
            for it in items
        ]
    )
    t0 = time.time()
    cpus = 1.0 if use_gpu else max(0.25, config.train.cpus_per_worker)
    predicted = ds.map_batches(
        PredictorActor,
        fn_constructor_kwargs={
            "checkpoint_ref": [ray.put(files)],
            "use_gpu": use_gpu,
            "num_threads": max(1, int(cpus)),
        },
        batch_size=config.eval.batch_size,
        concurrency=num_actors,
        num_cpus=cpus,
        num_gpus=1 if use_gpu else 0,
        batch_format="numpy",
    ).take_all()
    seconds = time.time() - t0
    results = [r for row in predicted for r in json.loads(row["results"])]
    stats = {
        "images": len(items),
        "people": int(sum(len(it.keypoints) for it in items)),
        "seconds": seconds,
        "images_per_s": len(items) / max(seconds, 1e-9),
        "people_per_s": sum(len(it.keypoints) for it in items) / max(seconds, 1e-9),
    }
    return results, stats
