"""Training-time validation, run inside the Ray Train workers: every rank predicts its share of
the val split through :class:`pose2seg.inference.Predictor` (:func:`predict_rows`), rank 0
scores the whole split against the val annotation file under ``eval.protocol``
(:func:`validate`), exactly as ``evaluate.py --split val`` does; its AP picks the best
checkpoint and decides whether the registry alias moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pose2seg.config import Config
from workflows.train_input import decode_batch


def _val_rows(batch: dict[str, np.ndarray], mine: list[int], *, full: bool) -> list[dict]:
    """Stored val rows ``mine`` of a numpy batch, images decoded: whole rows (``full``, the
    baseline's batches need them) or only what the one prediction path reads."""
    from preprocessing.schema import decode_image

    if full:
        return decode_batch({k: batch[k][mine] for k in batch})
    keep = ("image_id", "image", "orig_height", "orig_width")
    rows = [{k: batch[k][i] for k in keep} for i in mine]
    for row in rows:
        row["image"] = decode_image(bytes(row["image"]))
    return rows


def predict_rows(
    model,
    rows: list[dict[str, Any]],
    *,
    config: Config,
    device,
    templates: np.ndarray | None = None,
    keypoints: dict[int, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """COCO results (original image frame) for stored val rows with the given model: what
    training-time validation predicts (:attr:`pose2seg.arch.Architecture.predict_rows`).

    Pose2Seg goes through :meth:`pose2seg.inference.Predictor.predict_frames`, the one
    prediction path: the stored input-frame image (what :func:`pose2seg.input_frame.
    resize_to_input_frame` returned in preprocessing) and the split's ground-truth keypoints
    (``keypoints``: image id -> (N,K,3) original frame, :func:`workflows.eval_io.gt_keypoints`);
    nothing else stored is used (no stored affines, features, boxes or masks). ``rows`` need
    ``image_id``, ``image`` (encoded bytes or a decoded array), ``orig_height``, ``orig_width``.
    """
    from pose2seg.arch import architecture
    from preprocessing.schema import decode_image

    decoded = []
    for row in rows:
        image = row["image"]
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
            row = {**row, "image": decode_image(bytes(image))}
        decoded.append(row)
    return architecture(config).predict_rows(
        model, decoded, config=config, device=device, templates=templates, keypoints=keypoints
    )


@dataclass
class ValidationData:
    """The val split as evaluate.py sees it (see :func:`load_validation_data`)."""

    gt: dict[str, Any]
    """COCO ground truth under ``eval.protocol``, with ``max_iou``."""
    keypoints: dict[int, np.ndarray]
    """image id -> (N,K,3) ground-truth keypoints given to the model."""


def load_validation_data(config: Config) -> ValidationData:
    """The val split's annotation file read exactly as ``evaluate.py --split val`` reads it."""
    from workflows.eval_io import gt_keypoints, load_gt, protocol_gt, split_paths, with_max_iou

    raw = with_max_iou(load_gt(split_paths(config, "val")[0]))
    unlabelled = config.model.unlabelled_people == "whole_image"
    return ValidationData(
        gt=protocol_gt(raw, config.eval.protocol),
        keypoints=gt_keypoints(raw, include_unlabelled=unlabelled),
    )


def validate(
    model,
    val_iter,
    *,
    config: Config,
    device,
    rank: int,
    world: int,
    val_data: ValidationData,
    templates: np.ndarray | None = None,
) -> dict[str, float]:
    """Segm AP on the whole val split, computed as ``evaluate.py`` computes it: each rank
    predicts every ``world``-th stored image through the one prediction path, rank 0 gathers
    the results and scores them against the annotation file under ``eval.protocol``
    (:func:`workflows.eval_io.split_metrics`). Returns metrics on every rank."""
    import torch.distributed as dist

    from pose2seg.arch import architecture
    from workflows.eval_io import split_metrics

    arch = architecture(config)
    net = getattr(model, "module", model)
    net.eval()
    results: list[dict[str, Any]] = []
    predicted = 0
    index = 0
    for batch in val_iter.iter_batches(batch_size=config.eval.batch_size, batch_format="numpy"):
        n = len(next(iter(batch.values())))
        mine = [i for i in range(n) if (index + i) % world == rank]
        index += n
        if not mine:
            continue
        rows = _val_rows(batch, mine, full=arch.full_val_rows)
        results.extend(
            arch.predict_rows(
                net,
                rows,
                config=config,
                device=device,
                templates=templates,
                keypoints=val_data.keypoints,
            )
        )
        predicted += len(rows)
    net.train()
    payload = (results, predicted)
    if world > 1 and dist.is_initialized():
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, payload)
    else:
        gathered = [payload]
    metrics = {}
    if rank == 0:
        all_results = [r for res, _ in gathered for r in res]
        gt = val_data.gt
        m, _ = split_metrics(gt, all_results, config, by_bin=False)
        metrics = {f"val_{k}": v for k, v in m.items() if k != "occluded_num_people"}
        metrics["val_num_images"] = float(len(gt["images"]))
        metrics["val_num_images_predicted"] = float(sum(p for _, p in gathered))
        metrics["val_num_people"] = float(
            sum(1 for a in gt["annotations"] if not a.get("iscrowd", 0))
        )
    if world > 1 and dist.is_initialized():
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics
