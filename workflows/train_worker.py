"""The Ray Train worker loop (:func:`train_loop_per_worker`), run in every training worker
process: its fixed parts (:class:`Worker`), its state saved and restored whole
(:class:`TrainState`), one epoch of optimisation (:func:`train_epoch`) and the epoch's end
(:func:`end_epoch`: validation, checkpoint, report, MLflow metrics on rank 0)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pose2seg.config import Config
from workflows.coco_metrics import VAL_METRIC
from workflows.mlflow_tracking import log_params
from workflows.train_input import (
    build_augmenter,
    decode_batch,
    init_weights_state,
    load_init_weights,
    local_pretrained_backbone,
    lr_scale,
    steps_per_epoch,
    train_stream,
    worker_batch_size,
    worker_threads,
)
from workflows.train_progress import EpochProgress, say
from workflows.train_validation import ValidationData, load_validation_data, validate


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
    placement: list[dict[str, Any]] = field(default_factory=list)
    """Where the ranks ran: ``{"epoch": first epoch (1-based), "nodes": [node id by rank]}``,
    one entry each time the worker group changed (a restart, an elastic resize)."""

    @classmethod
    def build(
        cls, config: Config, *, total_steps: int, amp_dtype, device_type: str = "cpu"
    ) -> TrainState:
        import torch

        from pose2seg.arch import build_model
        from pose2seg.engine import build_lr_schedule, build_optimizer

        model = build_model(
            local_pretrained_backbone(config).model, input_size=config.data.input_size
        )
        init_state = init_weights_state(config)
        if init_state is not None:
            load_init_weights(model, init_state, ref=config.train.init_weights)
        optimizer = build_optimizer(model, config.train)
        scheduler = build_lr_schedule(optimizer, config.train, total_steps)
        # fp16 needs loss scaling (its exponent range is narrow); bf16 and fp32 do not.
        scaler = torch.amp.GradScaler(device_type) if amp_dtype == torch.float16 else None
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
        self.placement = list(loaded.state.get("placement", []))

    def restore_from(self, checkpoint) -> None:
        """Restore from a Ray Train checkpoint through this worker's own local copy.

        Not ``checkpoint.as_directory()``: for a checkpoint on S3 that hands every process of a
        machine one shared temporary folder, and a process that waited for another's download
        gets the folder as that download left it, half-written when the downloader died (a
        restarting worker group). The CI lost-node run of 2026-12-06 failed that way
        ("PytorchStreamReader failed reading file" at the regrowth restart).
        """
        with tempfile.TemporaryDirectory(prefix="pose2seg-restore-") as own:
            self.restore(checkpoint.to_directory(own))

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
                "placement": self.placement,
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
    batch_size: int  # images per step on this worker (train.elastic_batch)
    node_ids: list[str]  # the Ray node id of every rank, by rank
    augmenter: Any  # build_augmenter(...) or None
    val_shard: Any
    val_data: ValidationData
    metrics_log: Any  # mlflow_buffer.MetricBuffer of the run on rank 0 when tracked, else None
    run_t0: float = field(default_factory=time.time)
    redone_noted: list[int] = field(default_factory=list)  # in the run's pose2seg.redone_epochs


@dataclass
class EpochStats:
    losses: list[float] = field(default_factory=list)
    people: int = 0
    images: int = 0
    step_seconds: float = 0.0  # forward + backward + optimiser; the rest of the epoch is input
    train_seconds: float = 0.0
    step_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    """MLflow step metrics (``step_loss``) of the epoch, logged with its checkpoint."""


def train_epoch(state: TrainState, worker: Worker, batches, *, first_epoch: int) -> EpochStats:
    """One epoch of optimisation steps over ``batches`` (this rank's numpy batches)."""
    config, stats, t0 = worker.config, EpochStats(), time.time()
    progress = EpochProgress(
        config,
        epoch=state.epoch,
        steps_per_epoch=worker.steps_per_epoch,
        first_epoch=first_epoch,
        run_t0=worker.run_t0,
        metrics_log=worker.metrics_log,
        enabled=worker.rank == 0,
        sink=stats.step_metrics,
    )
    for batch_np in batches:
        rows = decode_batch(batch_np)
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
        "world_size": worker.world,
        **val,
    }
    state.history.append({k: float(v) for k, v in metrics.items()})
    if not state.placement or state.placement[-1]["nodes"] != worker.node_ids:
        state.placement.append({"epoch": state.epoch, "nodes": list(worker.node_ids)})
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
    if worker.metrics_log is not None:
        # Logged once the epoch's checkpoint is stored: a job interrupted before that (a lost
        # node, --resume) redoes the epoch, and MLflow never holds the same step twice; the
        # epoch's step losses were held back until now for the same reason. Buffered: an
        # unreachable tracking server delays the metrics, never the training; what is lost (a
        # driver killed right here) the driver backfills from the checkpoint history.
        import json

        from workflows.mlflow_tracking import set_tags

        for step, values in stats.step_metrics:
            worker.metrics_log.log(values, step=step)
        worker.metrics_log.log(metrics, step=state.epoch)
        _note_redone_epochs(worker)
        _best_effort(
            worker,
            lambda: set_tags(
                worker.metrics_log.handle, {"pose2seg.worker_nodes": json.dumps(state.placement)}
            ),
        )
    return metrics


def _note_redone_epochs(worker: Worker) -> None:
    """Epochs this rank 0 trained again whose MLflow values stay the first attempt's: named in
    the run's tag ``pose2seg.redone_epochs`` (a node lost after the epoch's checkpoint was
    stored and before Ray Train registered it; the checkpoint's history has the redo's)."""
    from workflows.mlflow_tracking import note_redone_epochs

    redone = worker.metrics_log.superseded_steps("train_loss")
    if redone and redone != worker.redone_noted:
        if _best_effort(worker, lambda: note_redone_epochs(worker.metrics_log.handle, redone)):
            worker.redone_noted = redone


def scale_lr(state: TrainState, factor: float) -> None:
    """Scale the schedule's peak lr by ``factor`` (``train.elastic_batch``: 1 at the full world
    size); the current lr follows at once. Applied after a restore, whose scheduler state holds
    the lrs of the world size it was saved at."""
    sched = state.scheduler
    peaks = [group.get("initial_lr", group["lr"]) for group in state.optimizer.param_groups]
    sched.base_lrs = [peak * factor for peak in peaks]
    for group, base, fn in zip(
        state.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True
    ):
        group["lr"] = base * fn(sched.last_epoch)


def gather_node_ids(world: int) -> list[str]:
    """The Ray node id of every rank, by rank (one collective: every rank calls it)."""
    import ray

    own = ray.get_runtime_context().get_node_id()
    if world <= 1:
        return [own]
    import torch.distributed as dist

    ids: list[Any] = [None] * world
    dist.all_gather_object(ids, own)
    return [str(i) for i in ids]


def _setup_worker(loop_config: dict[str, Any]) -> tuple[TrainState, Worker]:
    """The run's fixed parts and its state, restored from Ray Train's checkpoint if any."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from pose2seg.arch import architecture
    from pose2seg.precision import resolve_precision

    config: Config = loop_config["config"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not config.train.use_gpu:
        torch.set_num_threads(worker_threads(config))
    torch.manual_seed(config.train.seed)  # identical init on every rank (DDP broadcasts anyway)
    np.random.seed(config.train.seed + rank)
    device = ray.train.torch.get_device()
    precision = resolve_precision(config.train.mixed_precision, device.type)
    amp_dtype = precision.dtype
    # An elastic run's world size is what Ray Train could place; a fixed one is num_workers.
    num_rows = loop_config.get("num_train_images")
    steps = (
        steps_per_epoch(config, int(num_rows), world)
        if num_rows is not None
        else int(loop_config["steps_per_epoch"])
    )
    arch = architecture(config)
    state = TrainState.build(
        config,
        total_steps=steps * config.train.epochs,
        amp_dtype=amp_dtype,
        device_type=device.type,
    )
    from workflows.train_failures import resume_checkpoint

    # Ray Train's checkpoint, or the driver's older one when that is unreadable (--resume).
    checkpoint = resume_checkpoint(loop_config.get("resume_plan"))
    if checkpoint is not None:
        state.restore_from(checkpoint)
        if rank == 0:
            say(
                f"[pose2seg] resuming from the checkpoint of epoch {state.epoch} "
                f"(step {state.step}) on {world} worker{'s' if world != 1 else ''}"
            )
    scale_lr(state, lr_scale(config, world))
    if arch.channels_last:
        # NHWC convolutions: faster steps on CPU (oneDNN) in our measurements, and the layout
        # tensor cores prefer on GPU. Weights only: activations follow the weights.
        state.model = state.model.to(memory_format=torch.channels_last)
    state.model = ray.train.torch.prepare_model(state.model)
    # Rank 0 logs to the job's MLflow run (a mlflow_tracking.RunHandle, plain data).
    handle = loop_config.get("mlflow") if rank == 0 else None
    from workflows.mlflow_tracking import metric_buffer

    val_ref = loop_config.get("val_data")
    worker = Worker(
        config=config,
        templates=loop_config["templates"],
        arch=arch,
        rank=rank,
        world=world,
        device=device,
        amp_dtype=amp_dtype,
        steps_per_epoch=steps,
        batch_size=worker_batch_size(config, world),
        node_ids=gather_node_ids(world),
        augmenter=build_augmenter(config, rank=rank),
        val_shard=ray.train.get_dataset_shard("val"),
        val_data=ray.get(val_ref[0]) if val_ref else load_validation_data(config),
        metrics_log=metric_buffer(handle) if handle is not None else None,
    )
    if rank == 0:
        # Ray Train's own "Started training worker group" line is off the console (console.py);
        # this one says it each time a worker group starts (a restart, an elastic resize).
        nodes = len(set(worker.node_ids))
        say(
            f"[pose2seg] {world} training worker{'s' if world != 1 else ''} started on "
            f"{nodes} node{'s' if nodes != 1 else ''}"
        )
        say(f"[pose2seg] training precision: {precision.describe()}")
        if handle is not None:
            _best_effort(
                worker,
                lambda: log_params(
                    handle,
                    {
                        "train.precision_resolved": precision.name,
                        "train.precision_reason": precision.reason,
                    },
                ),
            )
    return state, worker


def _best_effort(worker: Worker, call) -> bool:
    """A tag or param of rank 0 (not buffered like the metrics): skipped while the tracking
    server is unreachable, so it never holds up training (the buffer has said so once).
    Returns whether it was delivered."""
    from workflows.mlflow_buffer import is_unreachable

    if worker.metrics_log is None or worker.metrics_log.unreachable_since is not None:
        return False
    try:
        call()
    except Exception as exc:
        if not is_unreachable(exc):
            raise
        return False
    return True


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker. ``loop_config``: ``config`` (a Config), ``templates``
    ((T,K,2) float32), ``steps_per_epoch``, ``train_files`` (the Parquet manifest), ``val_data``
    (an object ref), ``mlflow`` (a RunHandle or None), ``read_runtime_env``."""
    from workflows.console import quiet_train_worker

    # Ray's INFO lines of this worker to its log files only (Ray Train configured its loggers
    # before this function runs); --debug on the driver leaves them on the console.
    quiet_train_worker(quiet=loop_config.get("quiet_ray", True))
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
            batch_size=worker.batch_size,
            buffer_size=config.train.shuffle_buffer_size,
        )
        stats = train_epoch(state, worker, batches, first_epoch=first_epoch)
        metrics = end_epoch(state, worker, stats)
    undelivered = []
    if worker.metrics_log is not None:
        worker.metrics_log.flush(force=True)
        undelivered = worker.metrics_log.undelivered()  # the driver delivers them later
    return {
        "metrics": metrics,
        "history": state.history,
        "placement": state.placement,
        "undelivered": undelivered,
    }
