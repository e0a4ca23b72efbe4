"""The Ray Train training loop, written once: ``train.py`` runs it, ``tune.py`` runs it per trial.

Driver side: :func:`prepare_data` (preprocess if needed, open the Parquet splits),
:func:`build_trainer` (a ``TorchTrainer`` from the config) and :func:`run_training` (the whole
job: MLflow run, fit, model logging and registration). Worker side:
:func:`train_loop_per_worker` (DDP, one shard of the training Parquet per worker, per-epoch
validation with pycocotools on the full val split, checkpoints every epoch).
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pose2seg.config import Config

VAL_METRIC = "val_segm_ap"


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


def _decode_batch(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    from preprocessing.schema import decode_row

    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [decode_row({k: batch[k][i] for k in keys}) for i in range(n)]


def predict_rows(
    model, rows: list[dict[str, Any]], *, config: Config, device
) -> list[dict[str, Any]]:
    """COCO results (original image frame) for decoded Parquet rows with the given model."""
    import torch

    if config.model.arch == "maskrcnn":
        from pose2seg.maskrcnn import detection_predict_results

        return detection_predict_results(
            getattr(model, "module", model), rows, config=config, device=device
        )

    from pose2seg.batch import collate
    from pose2seg.inference import encode_rle, logits_to_instances

    if not rows:
        return []
    batch = collate(rows, input_size=config.data.input_size).to(device)
    net = getattr(model, "module", model)
    with torch.no_grad():
        logits = net(batch.images, batch.batch_index, batch.affines, batch.skeleton).float()
    results: list[dict[str, Any]] = []
    start = 0
    for row in rows:
        n = len(row["person_ids"])
        if n == 0:
            continue
        affines = torch.as_tensor(
            np.asarray(row["affines"], dtype=np.float32), device=logits.device
        ).clone()
        # Compose original->input scaling so masks come out at the original image size.
        affines[:, :, :2] *= float(row["scale"])
        masks, scores = logits_to_instances(
            logits[start : start + n],
            affines,
            out_hw=(int(row["orig_height"]), int(row["orig_width"])),
            threshold=config.model.mask_threshold,
            exclusive=config.model.exclusive_masks,
        )
        for rle, score in zip(encode_rle(masks), scores.tolist(), strict=True):
            results.append(
                {
                    "image_id": int(row["image_id"]),
                    "category_id": 1,
                    "segmentation": rle,
                    "score": float(score),
                }
            )
        start += n
    return results


def _gt_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parts of decoded rows that ground truth needs (drops pixels and features)."""
    drop = {"image", "skeleton", "targets", "affines"}
    return [{k: v for k, v in row.items() if k not in drop} for row in rows]


def validate(model, val_iter, *, config: Config, device, rank: int, world: int) -> dict[str, float]:
    """Segm AP on the whole val split: each rank predicts every ``world``-th image, rank 0
    gathers all results and ground truth and runs pycocotools. Returns metrics on every rank."""
    import torch.distributed as dist

    from preprocessing.schema import gt_to_coco
    from workflows.coco_metrics import coco_segm_metrics, occluded_subset_ap

    net = getattr(model, "module", model)
    net.eval()
    results: list[dict[str, Any]] = []
    gt_rows: list[dict[str, Any]] = []
    index = 0
    for batch in val_iter.iter_batches(batch_size=config.eval.batch_size, batch_format="numpy"):
        keys = list(batch)
        n = len(batch[keys[0]])
        mine = [i for i in range(n) if (index + i) % world == rank]
        index += n
        if not mine:
            continue
        rows = _decode_batch({k: batch[k][mine] for k in keys})
        results.extend(predict_rows(net, rows, config=config, device=device))
        gt_rows.extend(_gt_rows(rows))
    net.train()
    payload = (results, gt_rows)
    if world > 1 and dist.is_initialized():
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, payload)
    else:
        gathered = [payload]
    metrics = {}
    if rank == 0:
        all_results = [r for res, _ in gathered for r in res]
        all_gt = [g for _, gts in gathered for g in gts]
        gt = gt_to_coco(all_gt)
        m = coco_segm_metrics(gt, all_results)
        metrics = {f"val_{k}": v for k, v in m.items()}
        occ = occluded_subset_ap(gt, all_results, min_iou=config.eval.occluded_min_iou)
        metrics["val_occluded_segm_ap"] = occ["occluded_segm_ap"]
        metrics["val_num_images"] = float(len(all_gt))
        metrics["val_num_people"] = float(sum(len(g["person_ids"]) for g in all_gt))
    if world > 1 and dist.is_initialized():
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def _maybe_inject_failure(loop_config: dict[str, Any], *, epoch: int, rank: int) -> None:
    """Test hook: raise once (marker file) at the start of ``fail_once_at_epoch``."""
    marker = loop_config.get("fail_once_marker")
    if not marker or rank != 0 or epoch != loop_config.get("fail_once_at_epoch", 1):
        return
    if not os.path.exists(marker):
        with open(marker, "w") as fh:
            fh.write(f"failed at epoch {epoch}\n")
        raise RuntimeError(f"injected worker failure at epoch {epoch} (test hook)")


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
    from pose2seg.augment import AugmentSettings, augment_batch, step_generator

    settings = AugmentSettings.from_config(config)
    if not settings.enabled or config.model.arch != "pose2seg":
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


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker. ``loop_config``: ``config`` (flat dict), ``templates``
    (T,K,2 list), ``steps_per_epoch``, ``mlflow`` (RunHandle fields or None), test hooks."""
    import ray.train
    import ray.train.torch
    import torch

    from pose2seg.batch import collate
    from pose2seg.checkpoint import load_checkpoint, save_checkpoint
    from pose2seg.engine import build_lr_schedule, build_optimizer, train_step
    from pose2seg.model import build_model

    config = Config.from_flat(loop_config["config"])
    templates = np.asarray(loop_config["templates"], dtype=np.float32)
    collate_fn = collate
    step_fn = functools.partial(train_step, dice_weight=config.train.dice_weight)
    if config.model.arch == "maskrcnn":
        # The baseline: same data, loop, budget and evaluation; its own batch layout and loss.
        from pose2seg.maskrcnn import collate_detection, detection_train_step

        collate_fn, step_fn = collate_detection, detection_train_step
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not config.train.use_gpu:
        torch.set_num_threads(worker_threads(config))
    torch.manual_seed(config.train.seed)  # identical init on every rank (DDP broadcasts anyway)
    np.random.seed(config.train.seed + rank)
    device = ray.train.torch.get_device()

    model = build_model(local_pretrained_backbone(config).model, input_size=config.data.input_size)
    augmenter = build_augmenter(config, rank=rank)
    optimizer = build_optimizer(model, config.train)
    steps_per_epoch = int(loop_config["steps_per_epoch"])
    total_steps = steps_per_epoch * config.train.epochs
    scheduler = build_lr_schedule(optimizer, config.train, total_steps)
    use_amp = config.train.use_gpu and config.train.mixed_precision and torch.cuda.is_available()
    amp_dtype = (
        torch.bfloat16
        if use_amp and torch.cuda.is_bf16_supported()
        else (torch.float16 if use_amp else None)
    )
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    start_epoch, step = 0, 0
    history: list[dict[str, float]] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            loaded = load_checkpoint(ckpt_dir, with_training_state=True)
        model.load_state_dict(loaded.model_state)
        if loaded.training_state:
            optimizer.load_state_dict(loaded.training_state["optimizer"])
            scheduler.load_state_dict(loaded.training_state["scheduler"])
            if scaler is not None and loaded.training_state.get("scaler"):
                scaler.load_state_dict(loaded.training_state["scaler"])
        start_epoch = int(loaded.state.get("epoch", 0))
        step = int(loaded.state.get("step", 0))
        history = list(loaded.state.get("history", []))
        if rank == 0:
            print(
                f"[pose2seg] resuming from the checkpoint of epoch {start_epoch} (step {step})",
                flush=True,
            )

    if config.model.arch == "pose2seg":
        # NHWC convolutions: ~10 % faster steps on CPU (oneDNN) in our measurements, and the
        # layout tensor cores prefer on GPU. Weights only: activations follow the weights.
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    handle = None
    if rank == 0 and loop_config.get("mlflow"):
        from workflows.mlflow_tracking import RunHandle

        handle = RunHandle(**loop_config["mlflow"])

    final_metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, config.train.epochs):
        _maybe_inject_failure(loop_config, epoch=epoch, rank=rank)
        t0 = time.time()
        losses, people, images = [], 0, 0
        step_seconds = 0.0  # forward + backward + optimiser; the rest of the epoch is input
        for batch_np in train_shard.iter_batches(
            batch_size=config.train.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=4 * config.train.batch_size,
            local_shuffle_seed=config.train.seed + 1000 * epoch + rank,
        ):
            rows = _decode_batch(batch_np)
            batch = collate_fn(rows, input_size=config.data.input_size).to(device)
            if augmenter is not None:  # issue 15: per-person augmentation, off by default
                batch = augmenter(batch, rows, step)
            t_step = time.time()
            stats = step_fn(
                model,
                batch,
                optimizer,
                scaler=scaler,
                autocast_dtype=amp_dtype,
                grad_clip_norm=config.train.grad_clip_norm,
                step=step,
            )
            scheduler.step()
            step_seconds += time.time() - t_step
            step += 1
            losses.append(stats["loss"])
            people += int(stats["num_people"])
            images += len(rows)
        train_seconds = time.time() - t0
        val = validate(model, val_shard, config=config, device=device, rank=rank, world=world)
        epoch_seconds = time.time() - t0
        metrics = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "train_images_per_s_worker": images / max(train_seconds, 1e-9),
            "train_people_per_s_worker": people / max(train_seconds, 1e-9),
            # Share of the training time this worker spent waiting for, decoding and
            # collating batches (0 = the input pipeline never held the model up).
            "train_input_fraction": 1.0 - step_seconds / max(train_seconds, 1e-9),
            "epoch_seconds": epoch_seconds,
            **val,
        }
        history.append({k: float(v) for k, v in metrics.items()})
        if rank == 0:
            print(
                f"[pose2seg] epoch {epoch + 1}/{config.train.epochs}  loss {metrics['train_loss']:.4f}  "
                f"val AP {metrics.get(VAL_METRIC, float('nan')):.3f}  AP50 {metrics.get('val_segm_ap50', float('nan')):.3f}  "
                f"occluded AP {metrics.get('val_occluded_segm_ap', float('nan')):.3f}  "
                f"{metrics['train_images_per_s_worker']:.1f} img/s/worker  "
                f"input {100 * metrics['train_input_fraction']:.0f}%  {epoch_seconds:.0f} s",
                flush=True,
            )
            if handle is not None:
                from workflows.mlflow_tracking import log_metrics

                log_metrics(handle, metrics, step=epoch + 1)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(
                    tmp,
                    model=model,
                    config=config,
                    templates=templates,
                    state={
                        "epoch": epoch + 1,
                        "step": step,
                        "metrics": metrics,
                        "history": history,
                    },
                    training_state={
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                    },
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        final_metrics = metrics
    return {"metrics": final_metrics, "history": history}


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


def prepare_data(config: Config, *, force: bool = False) -> PreparedData:
    """Generate (synthetic) and preprocess the dataset if needed; open both Parquet splits."""
    from preprocessing.pipeline import load_split, preprocess_dataset
    from preprocessing.storage import join, read_bytes

    summary = preprocess_dataset(config, force=force)
    train = load_split(config, "train")
    # The val split is read by every worker every epoch: materialise it once in the object
    # store instead of re-running its read tasks (which also compete for CPUs) each time.
    val = load_split(config, "val").materialize()
    import io

    templates = np.load(
        io.BytesIO(
            read_bytes(join(config.data.processed, config.preprocess_key(), "templates.npy"))
        )
    )
    return PreparedData(
        train=train,
        val=val,
        templates=templates.astype(np.float32),
        num_train_images=train.count(),
        summary=summary,
    )


def steps_per_epoch(config: Config, num_train_images: int) -> int:
    # Ray Data's streaming split gives every worker an equal share; the last batch may be short.
    per_worker = num_train_images // config.train.num_workers
    return max(1, math.ceil(per_worker / config.train.batch_size))


def build_trainer(
    config: Config,
    data: PreparedData,
    *,
    run_name: str,
    mlflow: dict[str, str] | None,
    callbacks: list | None = None,
    test_hooks: dict[str, Any] | None = None,
):
    """A ``TorchTrainer`` for the config: scaling, storage, failure handling, checkpoints."""
    import ray.train
    from ray.train.torch import TorchTrainer

    loop_config = {
        "config": config.to_flat(),
        "templates": data.templates.tolist(),
        "steps_per_epoch": steps_per_epoch(config, data.num_train_images),
        "mlflow": mlflow,
        **(test_hooks or {}),
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
        datasets={"train": data.train, "val": data.val},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


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


def run_training(
    config: Config,
    *,
    resume: str | None = None,
    register: bool | None = None,
    parent_run_id: str | None = None,
    test_hooks: dict[str, Any] | None = None,
) -> TrainOutcome:
    """The whole training job on an already-initialised Ray: data, MLflow run, fit, model
    logging and registration. ``resume``: an earlier run name to continue from its checkpoint."""
    from workflows import mlflow_tracking as tracking

    data = prepare_data(config)
    run_name = resume or config.train.run_name or new_run_name()
    handle = tracking.start_run(
        config,
        run_name=run_name,
        parent_run_id=parent_run_id,
        tags={
            "pose2seg.preprocess_key": config.preprocess_key(),
            "pose2seg.resumed": str(bool(resume)),
        },
    )
    print(
        f"[pose2seg] MLflow run {handle.run_id} in {tracking.redact_uri(handle.tracking_uri)}",
        flush=True,
    )
    trainer = build_trainer(
        config,
        data,
        run_name=run_name,
        mlflow={
            "tracking_uri": handle.tracking_uri,
            "run_id": handle.run_id,
            "experiment_id": handle.experiment_id,
        },
        test_hooks=test_hooks,
    )
    try:
        result = trainer.fit()
    except Exception:
        tracking.end_run(handle, status="FAILED")
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
            if config.model.arch == "pose2seg":
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
