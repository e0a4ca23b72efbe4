"""One place per architecture: what the training loop, its validation and the model builder
need from a model family, behind one small interface.

Pose2Seg and the torchvision Mask R-CNN baseline (``model.arch``) differ in how a batch is laid
out, how a step computes its loss, how the network is built and how it predicts on stored
validation rows; the loop and validation ask :func:`architecture` for these parts and test
``model.arch`` nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pose2seg.batch import collate
from pose2seg.checkpoint import load_checkpoint
from pose2seg.config import Config, ModelConfig
from pose2seg.engine import train_step
from pose2seg.inference import InputFrame, Predictor
from pose2seg.input_frame import input_frame_keypoints, input_frame_size
from pose2seg.maskrcnn import (
    build_maskrcnn,
    collate_detection,
    detection_predict_results,
    detection_train_step,
)
from pose2seg.model import Pose2Seg
from pose2seg.paper_geometry import official_input_keypoints, official_input_matrix

__all__ = ["ARCHITECTURES", "Architecture", "architecture", "build_model", "load_predictor"]


@dataclass(frozen=True)
class Architecture:
    """The parts of one model family."""

    name: str
    build: Callable[..., nn.Module]
    """``build(model_config, *, input_size=None) -> nn.Module``."""
    collate: Callable[..., Any]
    """``collate(rows, *, input_size) -> batch`` (a batch has ``.to(device)``) of decoded rows."""
    train_step: Callable[..., dict[str, float]]
    """``train_step(model, batch, optimizer, *, train_config, scaler, autocast_dtype,
    grad_clip_norm, step) -> {"loss", "num_people", ...}``: one optimisation step."""
    predict_rows: Callable[..., list[dict[str, Any]]]
    """``predict_rows(model, rows, *, config, device, templates, keypoints) -> COCO results``
    (original image frame) for decoded stored rows (``image`` an (h, w, 3) uint8 array)."""
    full_val_rows: bool
    """``predict_rows`` needs whole decoded rows (else only ``image_id``, ``image``,
    ``orig_height``, ``orig_width``: decoding skeletons and targets costs time)."""
    channels_last: bool
    """Train with NHWC weights (faster convolutions on CPU, the layout tensor cores prefer)."""
    person_augmentation: bool
    """The per-person augmentation of the aligned frame applies (``train.augment_*``)."""
    servable: bool
    """The pose-based pyfunc / Serve app can serve it, so a run registers it."""


def _pose2seg_collate(rows: list[dict], *, input_size: int):
    return collate(rows, input_size=input_size)


def _pose2seg_train_step(model, batch, optimizer, *, train_config, **kwargs) -> dict[str, float]:
    return train_step(model, batch, optimizer, dice_weight=train_config.dice_weight, **kwargs)


def _pose2seg_predict_rows(
    model: nn.Module,
    rows: Sequence[dict[str, Any]],
    *,
    config: Config,
    device,
    templates: np.ndarray | None,
    keypoints: dict[int, np.ndarray] | None,
) -> list[dict[str, Any]]:
    """Through the one prediction path (:meth:`pose2seg.inference.Predictor.predict_frames`):
    the stored input-frame image and the split's keypoints (image id -> (N,K,3) original
    frame); nothing else stored is used."""
    if not rows:
        return []
    if templates is None or keypoints is None:
        raise ValueError("Pose2Seg predicts from the model's templates and the keypoints")
    input_size = config.data.input_size
    official_frame = config.data.input_frame == "official"
    frames = []
    for row in rows:
        image_id = int(row["image_id"])
        image = row["image"]
        orig_hw = (int(row["orig_height"]), int(row["orig_width"]))
        if official_frame:
            h = w = input_size
        else:
            scale, h, w = input_frame_size(orig_hw, input_size)
        if image.shape[:2] != (h, w):
            raise ValueError(
                f"image {image_id}: the stored val image is {image.shape[0]}x{image.shape[1]}, "
                f"expected {h}x{w} for data.input_size={input_size}: re-run preprocessing"
            )
        if image_id not in keypoints:
            raise ValueError(
                f"image {image_id}: stored in the val Parquet but not in its annotations"
            )
        if official_frame:
            # The stored image is the official frame: the same m1 maps the keypoints.
            m1 = official_input_matrix(orig_hw, input_size)
            frame = InputFrame(
                image_id=image_id,
                image=image,
                keypoints=official_input_keypoints(keypoints[image_id], m1),
                orig_hw=orig_hw,
                scale=float(m1[0, 0]),
                input_matrix=m1,
            )
        else:
            frame = InputFrame(
                image_id=image_id,
                image=image,
                keypoints=input_frame_keypoints(keypoints[image_id], scale),
                orig_hw=orig_hw,
                scale=scale,
            )
        frames.append(frame)
    net = getattr(model, "module", model)
    predictor = Predictor(
        net,
        templates,
        config.model,
        device,
        input_size=input_size,
        precision=config.eval.mixed_precision,
        input_frame=config.data.input_frame,
    )
    return predictor.predict_frames(frames)


def _pose2seg_build(config: ModelConfig, *, input_size: int | None = None) -> nn.Module:
    return Pose2Seg(config=config)


def _maskrcnn_build(config: ModelConfig, *, input_size: int | None = None) -> nn.Module:
    return build_maskrcnn(config, input_size=input_size)


def _maskrcnn_collate(rows: list[dict], *, input_size: int):
    return collate_detection(rows, input_size=input_size)


def _maskrcnn_train_step(model, batch, optimizer, *, train_config, **kwargs) -> dict[str, float]:
    """Its own losses (torchvision's); ``train.dice_weight`` is Pose2Seg's only."""
    return detection_train_step(model, batch, optimizer, **kwargs)


def _maskrcnn_predict_rows(model, rows, *, config, device, templates=None, keypoints=None):
    """Detects people itself: keypoints and templates are not used."""
    return detection_predict_results(
        getattr(model, "module", model), rows, config=config, device=device
    )


ARCHITECTURES: dict[str, Architecture] = {
    "pose2seg": Architecture(
        name="pose2seg",
        build=_pose2seg_build,
        collate=_pose2seg_collate,
        train_step=_pose2seg_train_step,
        predict_rows=_pose2seg_predict_rows,
        full_val_rows=False,
        channels_last=True,
        person_augmentation=True,
        servable=True,
    ),
    "maskrcnn": Architecture(
        name="maskrcnn",
        build=_maskrcnn_build,
        collate=_maskrcnn_collate,
        train_step=_maskrcnn_train_step,
        predict_rows=_maskrcnn_predict_rows,
        full_val_rows=True,
        channels_last=False,
        person_augmentation=False,
        servable=False,
    ),
}


def architecture(config: ModelConfig | Config) -> Architecture:
    """The parts of ``model.arch`` (a model section or a whole config)."""
    model = config.model if isinstance(config, Config) else config
    try:
        return ARCHITECTURES[model.arch]
    except KeyError:
        raise ValueError(
            f"model.arch must be one of {sorted(ARCHITECTURES)}, got {model.arch!r}"
        ) from None


def build_model(config: ModelConfig, *, input_size: int | None = None) -> nn.Module:
    """The network of ``model.arch``: :class:`pose2seg.model.Pose2Seg`, or the torchvision
    Mask R-CNN baseline.

    Args:
        config: the model section.
        input_size: Mask R-CNN only: its internal resize (min and max side) is set to this so it
            sees images at the same resolution as Pose2Seg; None keeps torchvision's 800/1333.
    """
    return architecture(config).build(config, input_size=input_size)


def load_predictor(
    directory: str, *, device: str | torch.device = "cpu", precision: str = "fp32"
) -> Predictor:
    """The :class:`pose2seg.inference.Predictor` of a checkpoint folder
    (:mod:`pose2seg.checkpoint`): its network, pose templates, model config and input size;
    the one way batch inference, the pyfunc and the Serve replica load a checkpoint.

    ``precision``: one of :data:`pose2seg.config.PRECISIONS`, or ``from_checkpoint`` for the
    checkpoint config's ``serve.mixed_precision``. A reduced precision also runs the network
    channels-last where the architecture trains so (fp32 keeps the layout it always had)."""
    loaded = load_checkpoint(directory)
    if precision == "from_checkpoint":
        precision = loaded.config.serve.mixed_precision
    model = build_model(loaded.config.model)
    model.load_state_dict(loaded.model_state)
    predictor = Predictor(
        model,
        loaded.templates,
        loaded.config.model,
        device=device,
        input_size=loaded.config.data.input_size,
        precision=precision,
        input_frame=loaded.config.data.input_frame,
    )
    if predictor.precision.dtype is not None and architecture(loaded.config).channels_last:
        predictor.model = predictor.model.to(memory_format=torch.channels_last)
    predictor.training_config = loaded.config
    return predictor
