"""The Ray Train training loop, written once: ``train.py`` runs it, ``tune.py`` runs it per trial.

Driver side: :func:`prepare_data` (preprocess if needed, open the Parquet splits),
:func:`build_trainer` (a ``TorchTrainer`` from the config) and :func:`run_training` (the whole
job: MLflow run, fit, model logging and registration). Worker side:
:func:`train_loop_per_worker` (DDP, one shard of the training Parquet per worker, per-epoch
validation on the full val split, checkpoints every epoch). Validation (:func:`validate`)
predicts through :class:`pose2seg.inference.Predictor` and scores against the val annotation
file under ``eval.protocol``, exactly as ``evaluate.py --split val`` does: its AP picks the best
checkpoint and decides whether the registry alias moves.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pose2seg.config import Config
from workflows.coco_metrics import VAL_METRIC

# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


def _decode_batch(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    from preprocessing.schema import decode_row

    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [decode_row({k: batch[k][i] for k in keys}) for i in range(n)]


def _val_rows(batch: dict[str, np.ndarray], mine: list[int], *, full: bool) -> list[dict]:
    """Stored val rows ``mine`` of a numpy batch, images decoded: whole rows (``full``, the
    baseline's batches need them) or only what the one prediction path reads."""
    from preprocessing.schema import decode_image

    if full:
        return _decode_batch({k: batch[k][mine] for k in batch})
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
    return ValidationData(gt=protocol_gt(raw, config.eval.protocol), keypoints=gt_keypoints(raw))


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


def say(line: str) -> None:
    """One console line from a Train worker. Not ``print``: Ray Train V2 patches it in its
    workers to log through Train's logger and, when something wrapped ``sys.stdout``, to print
    as well, so the driver's console showed every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class EpochProgress:
    """Progress inside an epoch (rank 0): a line every ``train.progress_every_steps`` steps
    and/or every ``train.progress_every_seconds`` seconds, and the step loss to MLflow every
    ``train.mlflow_loss_every_steps`` steps."""

    def __init__(
        self,
        config: Config,
        *,
        epoch: int,
        steps_per_epoch: int,
        first_epoch: int,
        run_t0: float,
        handle=None,
        enabled: bool = True,
        clock=time.time,
        echo=None,
    ):
        self.config = config
        self.epoch = epoch
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.first_epoch = first_epoch
        self.run_t0 = run_t0
        self.handle = handle
        self.enabled = enabled
        self.clock = clock
        self.echo = echo or say
        self.t0 = clock()
        self.last_print = self.t0
        self.epoch_step = 0
        self.images = 0
        self.window: list[float] = []
        self.mlflow_window: list[float] = []

    def update(self, *, step: int, loss: float, images: int) -> str | None:
        """Record one step (``step``: global step count after it; ``images``: images of the
        step over all ranks). Returns the printed line, if any."""
        if not self.enabled:
            return None
        tc = self.config.train
        self.epoch_step += 1
        self.images += images
        self.window.append(loss)
        self.mlflow_window.append(loss)
        every = tc.mlflow_loss_every_steps
        if self.handle is not None and every > 0 and step % every == 0:
            from workflows.mlflow_tracking import log_metrics

            log_metrics(
                self.handle,
                {"step_loss": float(np.mean(self.mlflow_window))},
                step=step,
            )
            self.mlflow_window = []
        now = self.clock()
        by_steps = tc.progress_every_steps > 0 and self.epoch_step % tc.progress_every_steps == 0
        by_time = (
            tc.progress_every_seconds > 0 and now - self.last_print >= tc.progress_every_seconds
        )
        if not (by_steps or by_time) or self.epoch_step >= self.steps_per_epoch:
            return None
        elapsed = max(now - self.t0, 1e-9)
        per_step = elapsed / self.epoch_step
        epoch_eta = per_step * (self.steps_per_epoch - self.epoch_step)
        # The run's ETA: this epoch's pace for the rest of the epochs (validation not included).
        epochs_left = self.config.train.epochs - self.epoch - 1
        run_eta = epoch_eta + epochs_left * per_step * self.steps_per_epoch
        line = (
            f"[pose2seg] epoch {self.epoch + 1}/{self.config.train.epochs}  "
            f"step {self.epoch_step}/{self.steps_per_epoch}  loss {np.mean(self.window):.4f}  "
            f"{self.images / elapsed:.1f} img/s  ETA epoch {_mmss(epoch_eta)}  "
            f"run {_mmss(run_eta)} (+ validation)"
        )
        self.echo(line)
        self.window = []
        self.last_print = now
        return line


def _mmss(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


@dataclass
class TrainState:
    """What a worker trains, saved and restored whole: one checkpoint per epoch holds it all
    (with the config and the templates, so a checkpoint is also the model artifact)."""

    model: Any  # nn.Module (DDP-wrapped once prepared)
    optimizer: Any
    scheduler: Any
    scaler: Any  # torch.amp.GradScaler for fp16 on GPU, else None
    epoch: int = 0  # epochs done
    step: int = 0  # optimiser steps done
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def build(cls, config: Config, *, total_steps: int, amp_dtype) -> TrainState:
        import torch

        from pose2seg.engine import build_lr_schedule, build_optimizer
        from pose2seg.model import build_model

        model = build_model(
            local_pretrained_backbone(config).model, input_size=config.data.input_size
        )
        optimizer = build_optimizer(model, config.train)
        scheduler = build_lr_schedule(optimizer, config.train, total_steps)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        return cls(model, optimizer, scheduler, scaler)

    def restore(self, ckpt_dir: str) -> None:
        from pose2seg.checkpoint import load_checkpoint

        loaded = load_checkpoint(ckpt_dir, with_training_state=True)
        self.model.load_state_dict(loaded.model_state)
        if loaded.training_state:
            self.optimizer.load_state_dict(loaded.training_state["optimizer"])
            self.scheduler.load_state_dict(loaded.training_state["scheduler"])
            if self.scaler is not None and loaded.training_state.get("scaler"):
                self.scaler.load_state_dict(loaded.training_state["scaler"])
        self.epoch = int(loaded.state.get("epoch", 0))
        self.step = int(loaded.state.get("step", 0))
        self.history = list(loaded.state.get("history", []))

    def save(self, directory: str, *, config: Config, templates: np.ndarray, metrics) -> None:
        from pose2seg.checkpoint import save_checkpoint

        save_checkpoint(
            directory,
            model=self.model,
            config=config,
            templates=templates,
            state={
                "epoch": self.epoch,
                "step": self.step,
                "metrics": metrics,
                "history": self.history,
            },
            training_state={
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            },
        )


@dataclass
class Worker:
    """What stays fixed on a worker for the whole run."""

    config: Config
    templates: np.ndarray
    arch: Any  # pose2seg.arch.Architecture
    rank: int
    world: int
    device: Any
    amp_dtype: Any
    steps_per_epoch: int
    augmenter: Any  # build_augmenter(...) or None
    val_shard: Any
    val_data: ValidationData
    handle: Any  # RunHandle on rank 0 when the run is tracked, else None
    run_t0: float = field(default_factory=time.time)


@dataclass
class EpochStats:
    losses: list[float] = field(default_factory=list)
    people: int = 0
    images: int = 0
    step_seconds: float = 0.0  # forward + backward + optimiser; the rest of the epoch is input
    train_seconds: float = 0.0


def train_epoch(state: TrainState, worker: Worker, batches, *, first_epoch: int) -> EpochStats:
    """One epoch of optimisation steps over ``batches`` (this rank's numpy batches)."""
    config, stats, t0 = worker.config, EpochStats(), time.time()
    progress = EpochProgress(
        config,
        epoch=state.epoch,
        steps_per_epoch=worker.steps_per_epoch,
        first_epoch=first_epoch,
        run_t0=worker.run_t0,
        handle=worker.handle,
        enabled=worker.rank == 0,
    )
    for batch_np in batches:
        rows = _decode_batch(batch_np)
        batch = worker.arch.collate(rows, input_size=config.data.input_size).to(worker.device)
        if worker.augmenter is not None:  # per-person augmentation, off by default
            batch = worker.augmenter(batch, rows, state.step)
        t_step = time.time()
        out = worker.arch.train_step(
            state.model,
            batch,
            state.optimizer,
            train_config=config.train,
            scaler=state.scaler,
            autocast_dtype=worker.amp_dtype,
            grad_clip_norm=config.train.grad_clip_norm,
            step=state.step,
        )
        state.scheduler.step()
        stats.step_seconds += time.time() - t_step
        state.step += 1
        stats.losses.append(out["loss"])
        stats.people += int(out["num_people"])
        stats.images += len(rows)
        progress.update(step=state.step, loss=float(out["loss"]), images=len(rows) * worker.world)
    stats.train_seconds = time.time() - t0
    return stats


def end_epoch(state: TrainState, worker: Worker, stats: EpochStats) -> dict[str, Any]:
    """Validate, then checkpoint and report to Ray Train, then log to MLflow; returns the
    epoch's metrics. ``state.epoch`` counts the epoch as done."""
    import ray.train

    config, t0 = worker.config, time.time()
    if worker.rank == 0:
        say(
            f"[pose2seg] epoch {state.epoch + 1}/{config.train.epochs}  trained "
            f"{len(stats.losses)} steps in {stats.train_seconds:.0f} s; validating"
        )
    val = validate(
        state.model,
        worker.val_shard,
        config=config,
        device=worker.device,
        rank=worker.rank,
        world=worker.world,
        val_data=worker.val_data,
        templates=worker.templates,
    )
    val_seconds = time.time() - t0
    train_seconds = max(stats.train_seconds, 1e-9)
    state.epoch += 1
    metrics = {
        "epoch": state.epoch,
        "train_loss": float(np.mean(stats.losses)) if stats.losses else float("nan"),
        "lr": float(state.optimizer.param_groups[0]["lr"]),
        "train_images_per_s_worker": stats.images / train_seconds,
        "train_people_per_s_worker": stats.people / train_seconds,
        # Share of the training time this worker spent waiting for, decoding and
        # collating batches (0 = the input pipeline never held the model up).
        "train_input_fraction": 1.0 - stats.step_seconds / train_seconds,
        "epoch_seconds": stats.train_seconds + val_seconds,
        "train_seconds": stats.train_seconds,
        "val_seconds": val_seconds,
        **val,
    }
    state.history.append({k: float(v) for k, v in metrics.items()})
    if worker.rank == 0:
        say(
            f"[pose2seg] epoch {state.epoch}/{config.train.epochs}  loss {metrics['train_loss']:.4f}  "
            f"val AP {metrics.get(VAL_METRIC, float('nan')):.3f}  AP50 {metrics.get('val_segm_ap50', float('nan')):.3f}  "
            f"occluded AP {metrics.get('val_occluded_segm_ap', float('nan')):.3f}  "
            f"{metrics['train_images_per_s_worker']:.1f} img/s/worker  "
            f"input {100 * metrics['train_input_fraction']:.0f}%  {metrics['epoch_seconds']:.0f} s "
            f"(train {stats.train_seconds:.0f} s, val {val_seconds:.0f} s)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if worker.rank == 0:
            state.save(tmp, config=config, templates=worker.templates, metrics=metrics)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)
    if worker.handle is not None:
        # Logged once the epoch's checkpoint is stored: a job interrupted before that
        # redoes the epoch on --resume, and MLflow never holds the same step twice.
        from workflows.mlflow_tracking import log_metrics

        log_metrics(worker.handle, metrics, step=state.epoch)
    return metrics


def _setup_worker(loop_config: dict[str, Any]) -> tuple[TrainState, Worker]:
    """The run's fixed parts and its state, restored from Ray Train's checkpoint if any."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from pose2seg.arch import architecture

    config: Config = loop_config["config"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not config.train.use_gpu:
        torch.set_num_threads(worker_threads(config))
    torch.manual_seed(config.train.seed)  # identical init on every rank (DDP broadcasts anyway)
    np.random.seed(config.train.seed + rank)
    use_amp = config.train.use_gpu and config.train.mixed_precision and torch.cuda.is_available()
    amp_dtype = (
        torch.bfloat16
        if use_amp and torch.cuda.is_bf16_supported()
        else (torch.float16 if use_amp else None)
    )
    steps_per_epoch = int(loop_config["steps_per_epoch"])
    arch = architecture(config)
    state = TrainState.build(
        config, total_steps=steps_per_epoch * config.train.epochs, amp_dtype=amp_dtype
    )
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state.restore(ckpt_dir)
        if rank == 0:
            say(
                f"[pose2seg] resuming from the checkpoint of epoch {state.epoch} "
                f"(step {state.step})"
            )
    if arch.channels_last:
        # NHWC convolutions: faster steps on CPU (oneDNN) in our measurements, and the layout
        # tensor cores prefer on GPU. Weights only: activations follow the weights.
        state.model = state.model.to(memory_format=torch.channels_last)
    state.model = ray.train.torch.prepare_model(state.model)
    # Rank 0 logs to the job's MLflow run (a mlflow_tracking.RunHandle, plain data).
    handle = loop_config.get("mlflow") if rank == 0 else None
    val_ref = loop_config.get("val_data")
    worker = Worker(
        config=config,
        templates=loop_config["templates"],
        arch=arch,
        rank=rank,
        world=world,
        device=ray.train.torch.get_device(),
        amp_dtype=amp_dtype,
        steps_per_epoch=steps_per_epoch,
        augmenter=build_augmenter(config, rank=rank),
        val_shard=ray.train.get_dataset_shard("val"),
        val_data=ray.get(val_ref[0]) if val_ref else load_validation_data(config),
        handle=handle,
    )
    return state, worker


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker. ``loop_config``: ``config`` (a Config), ``templates``
    ((T,K,2) float32), ``steps_per_epoch``, ``train_files`` (the Parquet manifest), ``val_data``
    (an object ref), ``mlflow`` (a RunHandle or None), ``read_runtime_env``."""
    state, worker = _setup_worker(loop_config)
    config, first_epoch = worker.config, state.epoch
    stream = train_stream(
        [(str(u), int(n)) for u, n in loop_config["train_files"]],
        config=config,
        first_epoch=first_epoch,
        rank=worker.rank,
        world=worker.world,
        runtime_env=loop_config.get("read_runtime_env"),
    )
    metrics: dict[str, Any] = {}
    while state.epoch < config.train.epochs:
        batches = stream.epoch(
            state.epoch,
            batch_size=config.train.batch_size,
            buffer_size=config.train.shuffle_buffer_size,
        )
        stats = train_epoch(state, worker, batches, first_epoch=first_epoch)
        metrics = end_epoch(state, worker, stats)
    return {"metrics": metrics, "history": state.history}


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    """The preprocessed splits and what the loop needs to know about them."""

    train: Any  # ray.data.Dataset
    val: Any  # ray.data.Dataset
    templates: np.ndarray
    num_train_images: int
    summary: Any = None
    train_files: list[tuple[str, int]] = field(default_factory=list)
    """Every training Parquet file with its row count (the per-epoch reader's manifest)."""


def prepare_data(config: Config, *, force: bool = False) -> PreparedData:
    """Generate (synthetic) and preprocess the dataset if needed; open both Parquet splits."""
    from preprocessing.epoch_reader import list_parquet, whole_split_dataset
    from preprocessing.pipeline import (
        READ_CPUS,
        load_split,
        load_templates,
        preprocess_dataset,
        processed_dir,
    )

    summary = preprocess_dataset(config, force=force)

    train = load_split(config, "train")
    # Listed once per run: every epoch's per-rank file slices are cut from this manifest.
    train_files = list_parquet(processed_dir(config, "train"))
    # The val split is read by every worker every epoch: materialise it once in the object
    # store instead of re-running its read tasks (which also compete for CPUs) each time.
    # Read from a file list (no Ray Data Parquet listing: its footer-reader actors are each a
    # new worker process).
    val = whole_split_dataset(
        processed_dir(config, "val"),
        read_cpus=READ_CPUS,
        concurrency=2,
        runtime_env=_runtime_env(),
    ).materialize()
    templates = load_templates(config)
    return PreparedData(
        train=train,
        val=val,
        templates=templates.astype(np.float32),
        num_train_images=sum(n for _, n in train_files),
        summary=summary,
        train_files=train_files,
    )


def steps_per_epoch(config: Config, num_train_images: int) -> int:
    # Every worker trains on the same number of rows (preprocessing.epoch_reader); the last
    # batch may be short.
    per_worker = num_train_images // config.train.num_workers
    return max(1, math.ceil(per_worker / config.train.batch_size))


def build_trainer(
    config: Config,
    data: PreparedData,
    *,
    run_name: str,
    mlflow: Any,  # mlflow_tracking.RunHandle of the job's run, or None
    callbacks: list | None = None,
):
    """A ``TorchTrainer`` for the config: scaling, storage, failure handling, checkpoints."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    loop_config = {
        # Plain picklable objects: the typed config and the (T,K,2) float32 templates.
        "config": config,
        "templates": np.asarray(data.templates, dtype=np.float32),
        "steps_per_epoch": steps_per_epoch(config, data.num_train_images),
        "train_files": [[u, int(n)] for u, n in data.train_files],
        "read_runtime_env": _runtime_env(),
        # Validation scores against the val annotation file as evaluate.py reads it: read
        # once here and handed to the workers through the object store (a list, so Ray passes
        # the reference instead of resolving it into the config).
        "val_data": [ray.put(load_validation_data(config))],
        "mlflow": mlflow,
    }
    resources = {"CPU": config.train.cpus_per_worker}
    if config.train.use_gpu:
        resources["GPU"] = 1
    scaling = ray.train.ScalingConfig(
        num_workers=config.train.num_workers,
        use_gpu=config.train.use_gpu,
        resources_per_worker=resources,
    )
    run_config = ray.train.RunConfig(
        name=run_name,
        storage_path=_storage_path(config.train.storage_path),
        storage_filesystem=_storage_filesystem(config.train.storage_path),
        failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=config.train.num_to_keep,
            checkpoint_score_attribute=VAL_METRIC,
            checkpoint_score_order="max",
        ),
        callbacks=callbacks,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
        # Training input is read per epoch and per rank (iter_train_batches); only the
        # materialised val split goes through Ray Train, whole to every worker.
        datasets={"val": data.val},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )


def _runtime_env() -> dict[str, Any] | None:
    from preprocessing.pipeline import _runtime_env as read_env

    return read_env()


def _storage_path(path: str) -> str:
    if "://" in path:
        from preprocessing.storage import pyarrow_filesystem

        _, stripped = pyarrow_filesystem(path)
        return stripped
    return os.path.abspath(path)


def _storage_filesystem(path: str):
    if "://" in path:
        from preprocessing.storage import pyarrow_filesystem

        fs, _ = pyarrow_filesystem(path)
        return fs
    return None


def new_run_name(prefix: str = "pose2seg") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass
class TrainOutcome:
    """What a training job produced (printed by train.py, asserted by tests)."""

    run_name: str
    mlflow_run_id: str | None
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    checkpoint_path: str | None
    model_uri: str | None = None
    registration: Any = None
    tracking_uri: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def best_checkpoint(result):
    """The best checkpoint by val AP, falling back to the last one."""
    best = None
    try:
        best = result.get_best_checkpoint(VAL_METRIC, "max")
    except Exception:  # pragma: no cover - older result objects
        best = None
    return best or result.checkpoint


class RunNotFoundError(FileNotFoundError):
    """``--resume NAME`` names no run under ``train.storage_path`` (exit code 2)."""


def existing_runs(config: Config) -> list[str]:
    """Names of the runs (and Tune searches) under ``train.storage_path``."""
    from preprocessing.storage import list_dirs

    return list_dirs(_storage_uri(config.train.storage_path))


def _storage_uri(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def check_resumable(config: Config, name: str) -> None:
    """Raise :class:`RunNotFoundError` (one line listing the runs there) unless a run named
    ``name`` exists under ``train.storage_path``."""
    runs = existing_runs(config)
    if name in runs:
        return
    where = _storage_uri(config.train.storage_path)
    shown = ", ".join(runs[-20:]) if runs else "none"
    more = f" (last 20 of {len(runs)})" if len(runs) > 20 else ""
    raise RunNotFoundError(
        f"cannot resume {name!r}: no run of that name under train.storage_path={where}; "
        f"runs there{more}: {shown}"
    )


def check_new_run_name(config: Config, name: str) -> None:
    """A new run must not reuse a stored run's name: Ray Train would silently continue it."""
    if name in existing_runs(config):
        raise FileExistsError(
            f"a run named {name!r} already exists under train.storage_path="
            f"{_storage_uri(config.train.storage_path)}; continue it with --resume {name} "
            "or choose another train.run_name"
        )


def run_training(
    config: Config,
    *,
    resume: str | None = None,
    register: bool | None = None,
    parent_run_id: str | None = None,
) -> TrainOutcome:
    """The whole training job on an already-initialised Ray: data, MLflow run, fit, model
    logging and registration.

    ``resume``: the name of a run under ``train.storage_path`` to continue from its last
    checkpoint (:class:`RunNotFoundError` at once when there is none); its MLflow run (found by
    the ``pose2seg.run_name`` tag) is reopened, so a job has one run and one metric history.
    Without ``resume``, a ``train.run_name`` that already exists is an error (FileExistsError).
    An interrupted fit ends the MLflow run (KILLED / FAILED) before the error propagates; a
    run whose driver was killed outright is ended by the next job on the host
    (:func:`workflows.mlflow_tracking.end_orphaned_runs`) or continued by ``--resume``."""
    from workflows import mlflow_tracking as tracking

    run_name = resume or config.train.run_name or new_run_name()
    if resume:
        check_resumable(config, resume)
    else:
        check_new_run_name(config, run_name)
    for run_id in tracking.end_orphaned_runs(config):
        print(f"[pose2seg] ended MLflow run {run_id}: its driver process is gone", flush=True)
    data = prepare_data(config)
    tags = {
        "pose2seg.kind": "train",
        "pose2seg.preprocess_key": config.preprocess_key(),
        "pose2seg.resumed": str(bool(resume)),
    }
    handle = None
    if resume:
        handle = tracking.continue_run(
            config, run_name=run_name, extra_filter="tags.`pose2seg.kind` = 'train'", tags=tags
        )
        if handle is not None:
            print(f"[pose2seg] continuing MLflow run {handle.run_id} of {run_name}", flush=True)
        else:
            print(
                f"[pose2seg] no MLflow run of {run_name} in this tracking store: starting one",
                flush=True,
            )
    if handle is None:
        handle = tracking.start_run(
            config, run_name=run_name, parent_run_id=parent_run_id, tags=tags
        )
    print(
        f"[pose2seg] MLflow run {handle.run_id} in {tracking.redact_uri(handle.tracking_uri)}",
        flush=True,
    )
    trainer = build_trainer(
        config,
        data,
        run_name=run_name,
        mlflow=handle,
    )
    try:
        result = trainer.fit()
    except BaseException as exc:
        # Never leave the run RUNNING: KILLED for an interruption (Ctrl-C, SIGTERM from
        # `ray job stop`), FAILED for an error. `--resume` reopens it.
        interrupted = isinstance(exc, KeyboardInterrupt | SystemExit)
        tracking.end_run(handle, status="KILLED" if interrupted else "FAILED")
        print(
            f"[pose2seg] run {run_name} {'interrupted' if interrupted else 'failed'}; "
            f"continue it with --resume {run_name}",
            flush=True,
        )
        raise
    ckpt = best_checkpoint(result)
    metrics = dict(result.metrics or {})
    history = (
        (result.return_value or {}).get("history", []) if hasattr(result, "return_value") else []
    )
    outcome = TrainOutcome(
        run_name=run_name,
        mlflow_run_id=handle.run_id,
        metrics=metrics,
        history=history,
        checkpoint_path=ckpt.path if ckpt else None,
        tracking_uri=handle.tracking_uri,
    )
    do_register = config.registry.register if register is None else register
    if ckpt is not None:
        with ckpt.as_directory() as ckpt_dir:
            from pose2seg.checkpoint import load_checkpoint

            best_state = load_checkpoint(ckpt_dir).state
            best_ap = float(best_state.get("metrics", {}).get(VAL_METRIC, float("nan")))
            outcome.metrics["best_val_segm_ap"] = best_ap
            outcome.metrics["best_epoch"] = best_state.get("epoch")
            tracking.log_metrics(
                handle, {"best_val_segm_ap": best_ap}, step=int(best_state.get("epoch", 0))
            )
            from pose2seg.arch import architecture

            if architecture(config).servable:
                outcome.model_uri = tracking.log_pose2seg_model(handle, ckpt_dir)
            else:
                # The Mask R-CNN baseline is trained for comparison only: its metrics and
                # checkpoint are kept, but it is not served by the pose-based pyfunc.
                tracking.log_artifact_file(handle, os.path.join(ckpt_dir, "model.pt"), "baseline")
        if do_register and outcome.model_uri:
            outcome.registration = tracking.register_if_better(
                config, handle, outcome.model_uri, val_ap=best_ap
            )
    tracking.end_run(handle)
    return outcome
