"""The keypoint-detector stage of the workflows: poses for images that come without any.

``detector.weights`` says where Keypoint R-CNN's weights come from: ``torchvision`` (its
weights API: the file in ``$TORCH_HOME/hub/checkpoints/``, downloaded there on a machine with
internet), a local path, or an ``s3://`` URI (read here; ``pose2seg/`` stays pure torch).
:func:`load_keypoint_detector` builds a :class:`pose2seg.keypoint_detector.KeypointDetector`
from the config (the Serve replicas and the Ray Data actors call it);
:func:`run_keypoint_detection` runs it over many images with a pool of Ray Data actors
(``predict.py`` on a folder of images, ``evaluate.py --keypoints detector``).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from pose2seg.config import Config
from pose2seg.skeleton import NUM_KEYPOINTS

TORCHVISION_WEIGHTS = "torchvision"


def read_detector_state_dict(uri: str) -> dict[str, Any]:
    """A Keypoint R-CNN state dict from a local path or ``s3://`` URI; errors name the URI."""
    import torch

    from preprocessing.storage import read_bytes

    try:
        data = read_bytes(uri)
    except Exception as exc:
        raise FileNotFoundError(f"detector.weights {uri!r}: cannot be read: {exc}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"detector.weights {uri!r}: not a torch state dict: {exc}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # torchvision references' training checkpoints
    if not isinstance(state, dict):
        raise ValueError(f"detector.weights {uri!r}: not a torch state dict")
    return state


def load_keypoint_detector(config: Config, *, device: str = "cpu"):
    """The configured :class:`~pose2seg.keypoint_detector.KeypointDetector`."""
    from pose2seg.keypoint_detector import KeypointDetector, build_keypoint_rcnn

    d = config.detector
    common = {
        "min_size": d.min_size,
        "max_size": d.max_size,
        "max_people": d.max_people,
        "person_score_threshold": d.person_score_threshold,
    }
    if d.weights == TORCHVISION_WEIGHTS:
        model = build_keypoint_rcnn(pretrained=True, **common)
    else:
        state = read_detector_state_dict(d.weights)
        try:
            model = build_keypoint_rcnn(state_dict=state, **common)
        except RuntimeError as exc:  # load_state_dict: missing / unexpected keys, shapes
            first = str(exc).splitlines()[0]
            raise ValueError(
                f"detector.weights {d.weights!r}: not Keypoint R-CNN ResNet-50-FPN weights: {first}"
            ) from None
    return KeypointDetector(
        model, keypoint_score_threshold=d.keypoint_score_threshold, device=device
    )


class DetectorActor:
    """A Ray Data actor: one detector, images in, their people's keypoints out (JSON)."""

    def __init__(self, config_flat: dict[str, Any], use_gpu: bool = False, num_threads: int = 1):
        import torch

        torch.set_num_threads(max(1, num_threads))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.detector = load_keypoint_detector(Config.from_flat(config_flat), device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from preprocessing.schema import decode_image
        from preprocessing.storage import read_bytes

        ids, out = [], []
        for image_id, uri in zip(batch["image_id"], batch["uri"], strict=True):
            try:
                pixels = decode_image(read_bytes(str(uri)))
            except Exception as exc:
                raise ValueError(f"image {int(image_id)} ({uri}): cannot be read: {exc}") from exc
            found = self.detector.detect(pixels)
            ids.append(int(image_id))
            out.append(json.dumps(found.keypoints.tolist()))
        return {"image_id": ids, "keypoints": out}


def run_keypoint_detection(
    images: list[tuple[int, str]],
    *,
    config: Config,
    num_actors: int = 1,
    use_gpu: bool = False,
) -> dict[int, np.ndarray]:
    """``image id -> (N, 17, 3)`` detected keypoints for ``(image id, image URI)`` pairs."""
    import ray

    if not images:
        return {}
    cpus = 1.0 if use_gpu else max(0.25, config.train.cpus_per_worker)
    ds = ray.data.from_items([{"image_id": int(i), "uri": str(u)} for i, u in images])
    rows = ds.map_batches(
        DetectorActor,
        fn_constructor_kwargs={
            "config_flat": config.to_flat(),
            "use_gpu": use_gpu,
            "num_threads": max(1, int(cpus)),
        },
        batch_size=config.eval.batch_size,
        compute=ray.data.ActorPoolStrategy(size=num_actors),  # (Ray 2.51+: not concurrency=)
        num_cpus=cpus,
        num_gpus=1 if use_gpu else 0,
        batch_format="numpy",
    ).take_all()
    return {
        int(r["image_id"]): np.asarray(json.loads(r["keypoints"]), np.float32).reshape(
            -1, NUM_KEYPOINTS, 3
        )
        for r in rows
    }
