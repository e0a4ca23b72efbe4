"""Mixed precision on CPU and GPU (``*.mixed_precision``): how ``auto`` resolves on either kind
of hardware, the old boolean values, and a bf16 training step against fp32 on a fixed batch."""

from __future__ import annotations

import pytest
import torch

from pose2seg.config import Config, ConfigError
from pose2seg.precision import cpu_bf16_flags, cpu_native_bf16, resolve_precision


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("amx_bf16", "avx512_bf16"), "bf16"),
        (("avx512_bf16",), "bf16"),
        (("bf16",), "bf16"),  # Arm's BF16 extension
        ((), "fp32"),
    ],
)
def test_auto_on_cpu_follows_native_bf16(flags, expected):
    precision = resolve_precision("auto", "cpu", cpu_flags=flags)
    assert precision.name == expected
    assert precision.dtype == (torch.bfloat16 if expected == "bf16" else None)
    assert ("has native bf16" in precision.reason) == bool(flags)
    for flag in flags:
        assert flag in precision.reason


@pytest.mark.parametrize(
    ("cuda_bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)]
)
def test_auto_and_gpu_on_gpu_are_bf16_where_supported_else_fp16(cuda_bf16, expected):
    # The CPU's flags play no part on a GPU.
    for setting in ("auto", "gpu"):
        precision = resolve_precision(setting, "cuda", cpu_flags=(), cuda_bf16=cuda_bf16)
        assert precision.dtype == expected


def test_gpu_setting_keeps_every_cpu_in_fp32():
    for flags in ((), ("amx_bf16", "avx512_bf16")):
        assert resolve_precision("gpu", "cpu", cpu_flags=flags).dtype is None


@pytest.mark.parametrize(
    ("setting", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", None)]
)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_explicit_settings_ignore_the_hardware(setting, dtype, device):
    for flags in ((), ("avx512_bf16",)):
        precision = resolve_precision(setting, device, cpu_flags=flags, cuda_bf16=False)
        assert precision.dtype == dtype and precision.name == setting


def test_machine_flags_are_read_from_cpuinfo():
    flags = cpu_bf16_flags()
    with open("/proc/cpuinfo") as fh:
        text = fh.read()
    for flag in ("amx_bf16", "avx512_bf16"):
        assert (flag in flags) == (f" {flag}" in text)
    assert cpu_native_bf16(()) is False and cpu_native_bf16(("avx512_bf16",)) is True


@pytest.mark.parametrize(
    ("section", "default"), [("train", "auto"), ("eval", "fp32"), ("serve", "fp32")]
)
def test_precision_keys_take_their_values_and_the_old_booleans(section, default):
    # Training autocasts where the hardware computes bf16/fp16 natively; inference stays fp32.
    key = f"{section}.mixed_precision"
    assert Config().to_flat()[key] == default
    for value, expected in [
        ("bf16", "bf16"),
        ("auto", "auto"),
        ("FP32", "fp32"),
        (True, "gpu"),
        (False, "fp32"),
        ("true", "gpu"),
        ("false", "fp32"),
    ]:
        config = Config().with_overrides({key: value})
        assert getattr(config, section).mixed_precision == expected
    with pytest.raises(ConfigError, match=key):
        Config().with_overrides({key: "half"})


def test_shipped_paper_config_trains_in_fp32():
    from pathlib import Path

    from pose2seg.config import load_config

    paper = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "paper.yaml"))
    assert paper.train.mixed_precision == "fp32"  # the official code trains in fp32


def _fixed_batch(config: Config, seed: int = 0):
    from pose2seg.batch import PersonBatch
    from pose2seg.skeleton import NUM_SKELETON_CHANNELS

    g = torch.Generator().manual_seed(seed)
    size, s, people, images = config.data.input_size, config.model.roi_size, 6, 2
    affines = torch.zeros(people, 2, 3)
    for p in range(people):
        w = size * (0.4 + 0.1 * (p % 3))
        x0, y0 = (size - w) * 0.1 * p / people, (size - w) * 0.5
        affines[p] = torch.tensor([[s / w, 0.0, -x0 * s / w], [0.0, s / w, -y0 * s / w]])
    return PersonBatch(
        images=torch.randn(images, 3, size, size, generator=g),
        batch_index=torch.arange(people) % images,
        affines=affines,
        skeleton=torch.rand(people, NUM_SKELETON_CHANNELS, s, s, generator=g),
        targets=(torch.rand(people, s, s, generator=g) > 0.5).float(),
        image_ids=torch.arange(images),
        person_ids=torch.arange(people),
    )


def test_bf16_train_step_is_finite_close_to_fp32_and_keeps_fp32_weights():
    from pose2seg.arch import build_model
    from pose2seg.engine import build_optimizer, train_step

    config = Config().with_overrides(
        {
            "data.input_size": 64,
            "model.roi_size": 16,
            "model.fpn_channels": 16,
            "model.num_residual_units": 1,
            "model.seg_channels": 8,
        }
    )
    batch = _fixed_batch(config)
    losses, grads = {}, {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        model = build_model(config.model, input_size=config.data.input_size).train()
        model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, config.train)
        out = train_step(model, batch, optimizer, autocast_dtype=dtype, grad_clip_norm=0.0, step=0)
        losses[name] = out["loss"]
        grads[name] = torch.cat(
            [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        )
        # Master weights and their gradients stay fp32 under autocast.
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert grads[name].dtype == torch.float32
    assert torch.isfinite(torch.tensor(losses["bf16"]))
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)
    cosine = torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0)
    assert cosine > 0.9, f"bf16 gradients point elsewhere (cosine {cosine:.3f})"
    assert losses["bf16"] != losses["fp32"]  # autocast really ran in bf16
