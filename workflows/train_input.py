"""The training input of one Ray Train worker: its seeded Parquet slices per epoch
(:func:`train_stream`, :func:`iter_train_batches`), decoded and collated into batches, the
per-person augmentation (:func:`build_augmenter`), the worker's thread count, a local copy of
remote backbone weights and the whole-model weights of ``train.init_weights``."""

from __future__ import annotations

import math
import os
import tempfile
import uuid
from typing import Any

import numpy as np

from pose2seg.config import Config


def decode_batch(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Decoded rows (:func:`preprocessing.schema.decode_row`) of a numpy batch of stored rows."""
    from preprocessing.schema import decode_row

    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [decode_row({k: batch[k][i] for k in keys}) for i in range(n)]


def local_pretrained_backbone(config: Config) -> Config:
    """The config with an ``s3://`` (any URI) ``model.pretrained_backbone`` copied to a local
    file, since ``pose2seg`` reads local files only; other values are returned unchanged."""
    source = config.model.pretrained_source
    if "://" not in source:
        return config
    import hashlib

    from preprocessing.storage import read_bytes

    name = hashlib.sha256(source.encode()).hexdigest()[:16]
    local = os.path.join(tempfile.gettempdir(), "pose2seg-weights", f"{name}.pt")
    if not os.path.isfile(local):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        partial = f"{local}.{uuid.uuid4().hex}.part"
        with open(partial, "wb") as fh:
            fh.write(read_bytes(source))
        os.replace(partial, local)  # atomic: workers of one machine may race
    return config.with_overrides({"model.pretrained_backbone": local})


def init_weights_state(config: Config) -> dict[str, Any] | None:
    """The model state of ``train.init_weights`` (None when empty): a checkpoint folder, local
    or ``s3://``, or an MLflow model ``models:/NAME@ALIAS`` / ``runs:/...`` logged by this
    project (its ``checkpoint`` artifact), read from the config's tracking store.

    Raises:
        ValueError: naming ``train.init_weights`` when it cannot be read.
    """
    ref = config.train.init_weights.strip()
    if not ref:
        return None
    from pose2seg.checkpoint import load_checkpoint

    key = "train.init_weights"
    with tempfile.TemporaryDirectory(prefix="pose2seg-init-") as tmp:
        try:
            if ref.startswith(("models:/", "runs:/")):
                from workflows.batch_inference import resolve_checkpoint_dir
                from workflows.mlflow_tracking import client_for, resolve_tracking_uri

                client_for(resolve_tracking_uri(config))
                directory = resolve_checkpoint_dir(ref, tmp)
            elif "://" in ref:
                from preprocessing.storage import download_dir

                directory = tmp
                if download_dir(ref, directory) == 0:
                    raise FileNotFoundError(f"no files under {ref!r}")
            else:
                directory = ref
            return load_checkpoint(directory).model_state
        except Exception as exc:  # noqa: BLE001 - any unreadable source is the same user error
            message = " ".join(str(exc).split())
            raise ValueError(f"{key}: cannot read the weights of {ref!r}: {message}") from None


def load_init_weights(model: Any, state: dict[str, Any], *, ref: str) -> None:
    """Load ``state`` (strict) into ``model``; a mismatch is one ValueError line naming
    ``train.init_weights`` and the first differing tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or wrong:
        raise ValueError(
            f"train.init_weights: {ref!r} does not match the config's network (model.* keys): "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shapes {wrong[:4]}"
        )
    model.load_state_dict(state)


def build_augmenter(config: Config, *, rank: int):
    """The per-person training augmentation of ``train.augment_*`` / ``train.occlusion_*`` as
    ``augment(batch, rows, step) -> batch``, or None when every option is off (or for the
    Mask R-CNN baseline): then training is exactly what it is without augmentation."""
    from pose2seg.arch import architecture
    from pose2seg.augment import AugmentSettings, augment_batch, step_generator

    settings = AugmentSettings.from_config(config)
    if not settings.enabled or not architecture(config).person_augmentation:
        return None

    def augment(batch, rows: list[dict[str, Any]], step: int):
        import torch

        from preprocessing.schema import input_frame_masks

        masks = None
        if settings.geometric:
            masks = torch.from_numpy(input_frame_masks(rows, input_size=config.data.input_size)).to(
                batch.affines.device
            )
        generator = step_generator(config.train.seed, rank, step)
        return augment_batch(batch, masks, settings=settings, generator=generator)

    return augment


def worker_threads(config: Config) -> int:
    """Torch CPU threads of a training worker: ``train.torch_threads``, or its CPU share."""
    if config.train.torch_threads > 0:
        return config.train.torch_threads
    return max(1, int(round(config.train.cpus_per_worker)))


def train_stream(
    train_files: list[tuple[str, int]],
    *,
    config: Config,
    first_epoch: int,
    rank: int,
    world: int,
    runtime_env: dict[str, Any] | None = None,
):
    """This rank's training input from ``first_epoch`` to the last epoch, one stream for the
    run (:class:`preprocessing.epoch_reader.RankStream`, read by ``train.input_reader``): each
    epoch its share of a seeded file order, through a seeded local shuffle buffer."""
    from preprocessing.epoch_reader import RankStream, preserve_order
    from preprocessing.pipeline import READ_CPUS

    if config.train.input_reader == "ray_data":
        preserve_order()
    return RankStream(
        train_files,
        seed=config.train.seed,
        first_epoch=first_epoch,
        epochs=config.train.epochs,
        rank=rank,
        world=world,
        read_cpus=READ_CPUS,
        concurrency=config.train.read_concurrency,
        runtime_env=runtime_env,
        reader=config.train.input_reader,
    )


def iter_train_batches(
    train_files: list[tuple[str, int]],
    *,
    config: Config,
    epoch: int,
    rank: int,
    world: int,
    runtime_env: dict[str, Any] | None = None,
):
    """This rank's training batches of one epoch (dicts of per-column arrays), the same the
    loop gets for that epoch. Same config, seed and epoch -> same batches."""
    stream = train_stream(
        train_files,
        config=config.with_overrides({"train.epochs": epoch + 1}),
        first_epoch=epoch,
        rank=rank,
        world=world,
        runtime_env=runtime_env,
    )
    yield from stream.epoch(
        epoch,
        batch_size=config.train.batch_size,
        buffer_size=config.train.shuffle_buffer_size,
    )


def worker_batch_size(config: Config, world: int) -> int:
    """Images per worker per step at world size ``world`` (``train.elastic_batch``)."""
    if config.train.elastic_batch == "keep_global":
        return max(1, math.ceil(config.train.batch_size * config.train.max_workers / world))
    return config.train.batch_size


def lr_scale(config: Config, world: int) -> float:
    """The lr multiplier at world size ``world``: the linear scaling rule for
    ``keep_per_worker`` (1 at ``max_workers``), 1 for ``keep_global``."""
    if config.train.elastic_batch == "keep_global":
        return 1.0
    return world / config.train.max_workers


def steps_per_epoch(config: Config, num_train_images: int, world: int | None = None) -> int:
    """Optimiser steps per epoch at world size ``world`` (default: ``train.max_workers``): every
    rank takes the batches of the largest rank's share (preprocessing.epoch_reader)."""
    from preprocessing.epoch_reader import batches_per_epoch

    world = world or config.train.max_workers
    return batches_per_epoch(
        num_train_images, world=world, batch_size=worker_batch_size(config, world)
    )
