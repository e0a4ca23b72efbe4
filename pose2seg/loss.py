"""The training loss: per-pixel binary cross-entropy in the aligned frame."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["check_finite", "mask_loss"]


def mask_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel BCE-with-logits of every person's aligned mask.

    Args:
        logits: (P,S,S) mask logits.
        targets: (P,S,S) the visible masks warped into the aligned frame, in [0, 1].

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
    return F.binary_cross_entropy_with_logits(logits.float(), targets.to(torch.float32))


def check_finite(loss: torch.Tensor, *, step: int) -> None:
    """Raise ``FloatingPointError`` naming the step when ``loss`` is NaN or infinite."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite loss {value} at step {step}")
