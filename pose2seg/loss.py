"""The training loss: per-pixel binary cross-entropy in the aligned frame, optionally plus a
soft Dice term per person (``train.dice_weight``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["check_finite", "dice_loss", "mask_loss"]


def mask_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, dice_weight: float = 0.0
) -> torch.Tensor:
    """Mean per-pixel BCE-with-logits of every person's aligned mask, plus ``dice_weight``
    times the mean soft Dice loss of the people.

    BCE weighs every pixel alike, so a small person's boundary costs little; the Dice term
    (``1 - 2|p t| / (|p| + |t|)`` per person, smoothed by 1 pixel) scores each person's mask
    overlap as a whole, which is what mask AP at high IoU thresholds measures.

    Args:
        logits: (P,S,S) mask logits.
        targets: (P,S,S) the visible masks warped into the aligned frame, in [0, 1].
        dice_weight: weight of the Dice term (0 = BCE only, the paper's loss).

    Returns:
        A scalar. With P = 0 (images without people) an exact 0 that is still connected to
        ``logits``, so ``backward()`` works and every parameter gets a zero gradient.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape (P, S, S), got {tuple(logits.shape)}")
    if logits.shape[0] == 0 and targets.shape[0] == 0:
        # The mean over no pixels is NaN; the sum over none is an exact, differentiable zero.
        # (Targets of a batch without people may be shapeless empties.)
        return logits.float().sum() * 0.0
    if tuple(targets.shape) != tuple(logits.shape):
        raise ValueError(
            f"targets must have the shape of logits {tuple(logits.shape)} (P, S, S), got {tuple(targets.shape)}"
        )
    logits, targets = logits.float(), targets.to(torch.float32)
    loss = F.binary_cross_entropy_with_logits(logits, targets)
    if dice_weight > 0:
        loss = loss + dice_weight * dice_loss(logits, targets)
    return loss


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over people of ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)``, p = sigmoid(logits).

    Args:
        logits: (P,S,S) with P >= 1.
        targets: (P,S,S) in [0, 1].
    """
    probs = torch.sigmoid(logits.float()).flatten(1)
    truth = targets.to(torch.float32).flatten(1)
    overlap = (probs * truth).sum(1)
    dice = (2.0 * overlap + 1.0) / (probs.sum(1) + truth.sum(1) + 1.0)
    return (1.0 - dice).mean()


def check_finite(loss: torch.Tensor, *, step: int) -> None:
    """Raise ``FloatingPointError`` naming the step when ``loss`` is NaN or infinite."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite loss {value} at step {step}")
