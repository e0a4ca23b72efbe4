"""Which floating-point precision a training step or a forward pass runs in.

``train.mixed_precision``, ``eval.mixed_precision`` and ``serve.mixed_precision`` take one of
:data:`PRECISIONS`. ``auto`` autocasts to bf16 where the hardware computes it natively (a GPU
that supports bf16; a CPU with AMX-BF16 or AVX512-BF16 instructions, or an Arm CPU with BF16),
to fp16 on a GPU without bf16, and stays fp32 elsewhere. ``gpu`` (the training default, the
former ``train.mixed_precision: true``) applies the GPU rule only and keeps CPUs in fp32.
Autocast only: master weights, optimiser state and the loss stay fp32 (fp16 adds a GradScaler).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pose2seg.config import PRECISIONS, precision_setting

__all__ = [
    "PRECISIONS",
    "Precision",
    "cpu_bf16_flags",
    "cpu_native_bf16",
    "resolve_precision",
]

# /proc/cpuinfo flags of CPUs that compute bf16 natively (x86: AMX tiles, AVX512 dot products;
# Arm: the BF16 extension). oneDNN then runs bf16 convolutions and matmuls at up to twice the
# fp32 rate; without them it emulates bf16 and gains little.
NATIVE_BF16_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16", "bf16")


@dataclass(frozen=True)
class Precision:
    """The resolved precision of one process."""

    name: str
    """``bf16``, ``fp16`` or ``fp32``."""
    dtype: torch.dtype | None
    """The autocast dtype, or None for fp32."""
    reason: str
    """Why, in a few words (printed once and logged as an MLflow param)."""

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The native-bf16 flags this CPU reports in ``/proc/cpuinfo`` (empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags = set(value.split())
                    return tuple(f for f in NATIVE_BF16_FLAGS if f in flags)
    except OSError:
        pass
    return ()


def cpu_native_bf16(flags: tuple[str, ...] | None = None) -> bool:
    """Whether the CPU computes bf16 natively (``flags`` defaults to :func:`cpu_bf16_flags`)."""
    return bool(cpu_bf16_flags() if flags is None else flags)


def resolve_precision(
    setting: str,
    device_type: str,
    *,
    cpu_flags: tuple[str, ...] | None = None,
    cuda_bf16: bool | None = None,
) -> Precision:
    """The precision ``setting`` (one of :data:`PRECISIONS`) gives on ``device_type``.

    Args:
        setting: the config value.
        device_type: ``cpu`` or ``cuda``.
        cpu_flags: the CPU's native-bf16 flags (default: this machine's, :func:`cpu_bf16_flags`).
        cuda_bf16: whether the GPU supports bf16 (default: ``torch.cuda.is_bf16_supported()``).
    """
    setting = precision_setting(setting, "mixed_precision")

    if setting == "fp32":
        return Precision("fp32", None, "set to fp32")
    if setting == "bf16":
        return Precision("bf16", torch.bfloat16, "set to bf16")
    if setting == "fp16":
        return Precision("fp16", torch.float16, "set to fp16")
    # auto and gpu: the GPU rule.
    if device_type == "cuda":
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if cuda_bf16:
            return Precision("bf16", torch.bfloat16, "auto: the GPU supports bf16")
        return Precision("fp16", torch.float16, "auto: the GPU lacks bf16")
    if setting == "gpu":
        return Precision("fp32", None, "gpu: fp32 on CPU")
    flags = cpu_bf16_flags() if cpu_flags is None else cpu_flags
    if device_type == "cpu" and flags:
        return Precision(
            "bf16", torch.bfloat16, f"auto: the CPU has native bf16 ({', '.join(flags)})"
        )
    return Precision("fp32", None, "auto: no native bf16 on this CPU")
