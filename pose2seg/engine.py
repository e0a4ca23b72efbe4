"""Pure torch step functions of training and evaluation (no Ray, no MLflow).

The Ray Train loop in ``workflows/train_worker.py`` owns data loading, DDP, checkpoints and
reporting; it calls these for the maths of one step so they can be tested on their own.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from pose2seg.batch import PersonBatch
from pose2seg.config import TrainConfig
from pose2seg.loss import check_finite, mask_loss

__all__ = [
    "build_lr_schedule",
    "build_optimizer",
    "lr_factor",
    "train_step",
]

# Cosine decays to this fraction of the peak lr; warm-up starts at train.warmup_start_factor
# of it (WARMUP_START by default).
COSINE_FLOOR: float = 0.01
WARMUP_START: float = 0.1
STEP_MILESTONES: tuple[float, ...] = (2 / 3, 8 / 9)


def _forward(model: nn.Module, batch: PersonBatch) -> torch.Tensor:
    return model(batch.images, batch.batch_index, batch.affines, batch.skeleton)


def train_step(
    model: nn.Module,
    batch: PersonBatch,
    optimizer: torch.optim.Optimizer,
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    grad_clip_norm: float,
    step: int,
    dice_weight: float = 0.0,
) -> dict[str, float | int]:
    """One optimisation step on ``batch`` (already on the model's device; model in train mode).

    Args:
        model: a Pose2Seg (or a DDP wrapper of one).
        batch: a batch with targets.
        optimizer: its optimizer; the lr schedule is stepped by the caller.
        scaler: a GradScaler for fp16 autocast; None for fp32 or bf16.
        autocast_dtype: ``torch.bfloat16`` / ``torch.float16`` to autocast the forward pass, or
            None for fp32.
        grad_clip_norm: clip the global gradient norm to this (0 disables).
        step: global step number, named in the error when the loss is not finite.
        dice_weight: weight of the per-person Dice term added to the BCE (``train.dice_weight``).

    Returns:
        ``{"loss": float, "num_people": int, "grad_norm": float}`` (grad_norm is NaN when
        clipping is disabled).

    Raises:
        FloatingPointError: the loss is NaN or infinite (before any parameter is updated).
    """
    if batch.targets is None:
        raise ValueError(f"train_step: batch at step {step} has no targets")
    device_type = batch.images.device.type
    with torch.autocast(
        device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    ):
        logits = _forward(model, batch)
    loss = mask_loss(logits.float(), batch.targets, dice_weight=dice_weight)
    grad_norm = optimise(
        model, loss, optimizer, scaler=scaler, grad_clip_norm=grad_clip_norm, step=step
    )
    return {"loss": float(loss.detach()), "num_people": batch.num_people, "grad_norm": grad_norm}


def optimise(
    model: nn.Module,
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    scaler: torch.amp.GradScaler | None,
    grad_clip_norm: float,
    step: int,
) -> float:
    """Check the loss, back-propagate (scaled for fp16), clip and step; returns the gradient
    norm before clipping (NaN when clipping is disabled). Shared by every architecture's step.

    Raises:
        FloatingPointError: the loss is NaN or infinite (before any parameter is updated).
    """
    check_finite(loss, step=step)
    optimizer.zero_grad(set_to_none=True)
    grad_norm = float("nan")
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip_norm > 0:
            # Clip the true gradients, not the scaled ones.
            scaler.unscale_(optimizer)
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm))
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip_norm > 0:
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm))
        optimizer.step()
    return grad_norm


def build_optimizer(model: nn.Module, train_config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD (``train.optimizer``) with ``train.lr`` / ``train.weight_decay``.

    Biases and normalisation parameters (1-D tensors) get no weight decay: decaying BatchNorm
    scales towards 0 only fights the normalisation.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train_config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if train_config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train_config.lr)
    if train_config.optimizer == "adam":
        # L2 weight decay folded into the gradient (torch.optim.Adam); the official recipe: 0.
        return torch.optim.Adam(groups, lr=train_config.lr)
    if train_config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=train_config.lr, momentum=train_config.momentum, nesterov=True
        )
    raise ValueError(
        f"train.optimizer must be 'adamw', 'adam' or 'sgd', got {train_config.optimizer!r}"
    )


def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    schedule: str,
    warmup_start: float = WARMUP_START,
    milestones: tuple[float, ...] | list[float] = STEP_MILESTONES,
) -> float:
    """Multiplier of the peak lr at ``step`` (0-based).

    Linear warm-up from ``warmup_start`` to 1 over ``warmup_steps``, then ``cosine`` (to
    ``COSINE_FLOOR`` at ``total_steps``), ``step`` (x0.1 at each fraction ``milestones`` of
    ``total_steps``; by default 2/3 and 8/9) or ``constant``.
    """
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        passed = sum(1 for m in milestones if step >= total_steps * m)
        return 10.0**-passed  # exact 0.1 and 0.01
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return COSINE_FLOOR + (1.0 - COSINE_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.schedule must be one of cosine/step/constant, got {schedule!r}")


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, train_config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR of :func:`lr_factor`; call ``.step()`` after each optimizer step."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    factor = functools.partial(
        lr_factor,
        warmup_steps=train_config.warmup_steps,
        total_steps=total_steps,
        schedule=train_config.schedule,
        warmup_start=train_config.warmup_start_factor,
        milestones=tuple(train_config.step_milestones),
    )
    factor(train_config.warmup_steps)  # validates the schedule name
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
