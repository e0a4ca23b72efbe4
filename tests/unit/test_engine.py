"""Training/evaluation step functions: lr schedules, NaN handling, zero-people batches."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from pose2seg.batch import PersonBatch
from pose2seg.config import ModelConfig, TrainConfig
from pose2seg.engine import (
    build_lr_schedule,
    build_optimizer,
    lr_factor,
    train_step,
)
from pose2seg.model import Pose2Seg
from tests.helpers import evaluate_batches, predict_batch_logits

torch.set_num_threads(2)

SMALL = ModelConfig(fpn_channels=16, seg_channels=16, num_residual_units=1, roi_size=16)


def make_batch(num_people: int, *, size: int = 16, seed: int = 0) -> PersonBatch:
    gen = torch.Generator().manual_seed(seed)
    affines = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]).repeat(num_people, 1, 1)
    return PersonBatch(
        images=torch.randn(2, 3, 32, 32, generator=gen),
        batch_index=torch.arange(num_people) % 2,
        affines=affines,
        skeleton=torch.rand(num_people, 55, size, size, generator=gen),
        targets=(torch.rand(num_people, size, size, generator=gen) > 0.5).float(),
        image_ids=torch.tensor([1, 2]),
        person_ids=torch.arange(num_people),
    )


def test_warmup_and_cosine_values():
    kw = {"warmup_steps": 10, "total_steps": 110, "schedule": "cosine"}
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(5, **kw) == pytest.approx(0.55)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(60, **kw) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(110, **kw) == pytest.approx(0.01)
    assert lr_factor(500, **kw) == pytest.approx(0.01)


def test_step_and_constant_schedules():
    assert lr_factor(50, warmup_steps=0, total_steps=90, schedule="step") == 1.0
    assert lr_factor(60, warmup_steps=0, total_steps=90, schedule="step") == pytest.approx(0.1)
    assert lr_factor(80, warmup_steps=0, total_steps=90, schedule="step") == pytest.approx(0.01)
    assert lr_factor(80, warmup_steps=0, total_steps=90, schedule="constant") == 1.0


def test_lambda_schedule_drives_the_optimizer_lr():
    model = nn.Linear(2, 2)
    config = TrainConfig(lr=1e-2, warmup_steps=4, schedule="cosine")
    optimizer = build_optimizer(model, config)
    schedule = build_lr_schedule(optimizer, config, total_steps=20)
    lrs = []
    for _ in range(21):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[4] == pytest.approx(1e-2)
    assert lrs[20] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def test_optimizers_and_weight_decay_groups():
    model = Pose2Seg(config=SMALL)
    adamw = build_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.1))
    assert isinstance(adamw, torch.optim.AdamW)
    assert (
        adamw.param_groups[0]["weight_decay"] == 0.1
        and adamw.param_groups[1]["weight_decay"] == 0.0
    )
    assert all(p.ndim <= 1 for p in adamw.param_groups[1]["params"])
    sgd = build_optimizer(model, TrainConfig(optimizer="sgd", momentum=0.8))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8


def test_train_steps_reduce_the_loss_and_eval_reports_iou():
    torch.manual_seed(0)
    model = Pose2Seg(config=SMALL).train()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2))
    batch = make_batch(3)
    losses = [
        train_step(model, batch, optimizer, grad_clip_norm=5.0, step=s)["loss"] for s in range(15)
    ]
    assert losses[-1] < losses[0]
    metrics = evaluate_batches(model, [batch, make_batch(0)])
    assert metrics["num_people"] == 3
    assert 0.0 <= metrics["mask_iou"] <= 1.0 and metrics["loss"] > 0.0
    assert model.training, "evaluation must restore the training mode"


def test_zero_people_batch_gives_zero_loss():
    model = Pose2Seg(config=SMALL).train()
    optimizer = build_optimizer(model, TrainConfig())
    before = [p.detach().clone() for p in model.parameters()]
    out = train_step(model, make_batch(0), optimizer, grad_clip_norm=5.0, step=3)
    assert out["loss"] == 0.0 and out["num_people"] == 0
    assert predict_batch_logits(model, make_batch(0)).shape == (0, 16, 16)
    # Zero gradients; AdamW's decoupled weight decay may still shrink weights a little.
    for p, q in zip(before, model.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-6)


class NaNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, images, batch_index, affines, skeleton):
        return self.weight * torch.full((affines.shape[0], 16, 16), math.nan)


def test_nan_loss_raises_naming_the_step_before_updating():
    model = NaNModel()
    optimizer = build_optimizer(model, TrainConfig())
    with pytest.raises(FloatingPointError, match="step 42"):
        train_step(model, make_batch(2), optimizer, grad_clip_norm=1.0, step=42)
    assert float(model.weight.detach()) == 1.0


def test_batch_without_targets_cannot_train():
    batch = dataclasses.replace(make_batch(1), targets=None)
    model = Pose2Seg(config=SMALL)
    with pytest.raises(ValueError, match="no targets"):
        train_step(model, batch, build_optimizer(model, TrainConfig()), grad_clip_norm=0.0, step=0)
