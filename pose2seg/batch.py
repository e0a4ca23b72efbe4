"""A training/inference batch: the images of B pictures and the P people in them.

People of all images are flattened into one axis; ``batch_index`` says which image each
person belongs to, so Affine-Align handles every person of the batch in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from pose2seg.skeleton import NUM_KEYPOINTS, NUM_SKELETON_CHANNELS

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PersonBatch", "collate", "normalise_images"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# int8 skeleton features store round(x * 127) (docs/ARCHITECTURE.md).
_SKELETON_QUANT = 127.0


@dataclass
class PersonBatch:
    """Tensors of one batch. B images, P people (P may be 0), S RoI side, K keypoints."""

    images: torch.Tensor
    """(B,3,H,W) float32, ImageNet-normalised, padded bottom/right to input_size x input_size."""
    batch_index: torch.Tensor
    """(P,) long: the image of each person, in [0, B)."""
    affines: torch.Tensor
    """(P,2,3) float32: input frame -> aligned frame."""
    skeleton: torch.Tensor
    """(P,55,S,S) float32 skeleton features in [-1, 1]."""
    targets: torch.Tensor | None
    """(P,S,S) float32 aligned visible masks, or None when predicting."""
    image_ids: torch.Tensor
    """(B,) long COCO image ids."""
    person_ids: torch.Tensor
    """(P,) long annotation ids."""
    keypoints: torch.Tensor | None = None
    """(P,K,3) float32 input-frame keypoints, when the rows carry them."""

    @property
    def num_people(self) -> int:
        """P."""
        return int(self.batch_index.shape[0])

    @property
    def num_images(self) -> int:
        """B."""
        return int(self.images.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PersonBatch:
        """A copy with every tensor on ``device``."""
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = (
                value.to(device, non_blocking=non_blocking) if value is not None else None
            )
        return PersonBatch(**moved)


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """(B,H,W,3) uint8 -> (B,3,H,W) float32 ImageNet-normalised."""
    x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _skeleton_to_float(skeleton: np.ndarray) -> np.ndarray:
    if skeleton.dtype == np.int8:
        return skeleton.astype(np.float32) / _SKELETON_QUANT
    return skeleton.astype(np.float32, copy=False)


def collate(rows: list[dict], *, input_size: int, roi_size: int | None = None) -> PersonBatch:
    """Stack decoded image rows into a :class:`PersonBatch`.

    Args:
        rows: decoded rows, one per image: ``image_id`` int, ``image`` (h,w,3) uint8 in the
            input frame (unpadded, h, w <= input_size), ``affines`` (N,2,3), ``skeleton``
            (N,55,S,S) int8 (x = q/127) or float, ``targets`` (N,S,S) bool or None,
            ``person_ids`` (N,), optional ``keypoints`` (N,K,3). N may be 0.
        input_size: side of the padded square input frame.
        roi_size: S, only used to shape the empty arrays of a batch without any person (else
            read from the skeleton arrays); without it such a batch gets S = 0 empties.

    Returns:
        The batch; ``targets`` is None when the rows carry none (prediction).
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    num_images = len(rows)
    padded = np.zeros((num_images, input_size, input_size, 3), dtype=np.uint8)
    affines, skeletons, targets, person_ids, keypoints, batch_index = [], [], [], [], [], []
    has_targets = [row.get("targets") is not None for row in rows]
    if any(has_targets) and not all(has_targets):
        missing = [
            int(row["image_id"]) for row, has in zip(rows, has_targets, strict=True) if not has
        ]
        raise ValueError(f"targets: rows of images {missing} have no targets but others do")
    has_keypoints = all(row.get("keypoints") is not None for row in rows)
    for b, row in enumerate(rows):
        image_id = int(row["image_id"])
        image = np.asarray(row["image"])
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image {image_id}: image must be (h, w, 3) uint8, got {image.shape} {image.dtype}"
            )
        h, w = image.shape[:2]
        if h > input_size or w > input_size:
            raise ValueError(
                f"image {image_id}: image of size {h}x{w} exceeds data.input_size={input_size}"
            )
        padded[b, :h, :w] = image
        row_affines = np.asarray(row["affines"], dtype=np.float32).reshape(-1, 2, 3)
        n = row_affines.shape[0]
        row_skeleton = _skeleton_to_float(np.asarray(row["skeleton"]))
        if n == 0 and row_skeleton.size == 0:
            # Decoders may hand back shapeless empties for images without people.
            person_ids.append(np.zeros(0, dtype=np.int64))
            continue
        if (
            row_skeleton.ndim != 4
            or row_skeleton.shape[0] != n
            or row_skeleton.shape[1] != NUM_SKELETON_CHANNELS
        ):
            raise ValueError(
                f"image {image_id}: skeleton must be ({n}, {NUM_SKELETON_CHANNELS}, S, S), got {row_skeleton.shape}"
            )
        size = row_skeleton.shape[2]
        if roi_size is None:
            roi_size = size
        elif size != roi_size:
            raise ValueError(
                f"image {image_id}: skeleton RoI size {size} differs from {roi_size} in the batch"
            )
        ids = np.asarray(row["person_ids"], dtype=np.int64).reshape(-1)
        if ids.shape[0] != n:
            raise ValueError(f"image {image_id}: {ids.shape[0]} person_ids for {n} people")
        affines.append(row_affines)
        skeletons.append(row_skeleton)
        person_ids.append(ids)
        batch_index.append(np.full(n, b, dtype=np.int64))
        if has_targets[b]:
            row_targets = np.asarray(row["targets"])
            if row_targets.shape != (n, size, size):
                raise ValueError(
                    f"image {image_id}: targets must be ({n}, {size}, {size}), got {row_targets.shape}"
                )
            targets.append(row_targets.astype(np.float32))
        if has_keypoints:
            keypoints.append(
                np.asarray(row["keypoints"], dtype=np.float32).reshape(n, NUM_KEYPOINTS, 3)
            )
    # A batch without any person and no roi_size gets S = 0: its (0,55,0,0) / (0,0,0) empties are
    # accepted by the model and the loss, so such batches need no special casing upstream.
    size = int(roi_size) if roi_size is not None else 0
    empty_skeleton = np.zeros((0, NUM_SKELETON_CHANNELS, size, size), dtype=np.float32)
    skeletons.append(empty_skeleton)
    affines.append(np.zeros((0, 2, 3), dtype=np.float32))
    batch_index.append(np.zeros(0, dtype=np.int64))
    targets.append(np.zeros((0, size, size), dtype=np.float32))
    keypoints.append(np.zeros((0, NUM_KEYPOINTS, 3), dtype=np.float32))
    return PersonBatch(
        images=normalise_images(torch.from_numpy(padded)),
        batch_index=torch.from_numpy(np.concatenate(batch_index)),
        affines=torch.from_numpy(np.concatenate(affines)),
        skeleton=torch.from_numpy(np.concatenate(skeletons)),
        targets=torch.from_numpy(np.concatenate(targets)) if all(has_targets) else None,
        image_ids=torch.tensor([int(row["image_id"]) for row in rows], dtype=torch.long),
        person_ids=torch.from_numpy(np.concatenate(person_ids)),
        keypoints=torch.from_numpy(np.concatenate(keypoints)) if has_keypoints else None,
    )
