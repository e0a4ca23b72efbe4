"""What a changed world size (an elastic ``train.num_workers`` range) does to the batch, the
learning rate and the steps per epoch (``train.elastic_batch``); no Ray."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pose2seg.config import Config, ConfigError, load_config
from pose2seg.engine import build_lr_schedule
from workflows.train_input import lr_scale, steps_per_epoch, worker_batch_size
from workflows.train_worker import scale_lr


def _config(**overrides) -> Config:
    return Config().with_overrides(
        {"train.num_workers": [1, 4], "train.batch_size": 8, **overrides}
    )


def test_a_range_parses_and_a_number_stays_fixed():
    config = load_config(None, ["train.num_workers=[2, 8]"])
    assert (config.train.min_workers, config.train.max_workers, config.train.elastic) == (
        2,
        8,
        True,
    )
    fixed = Config()
    assert (fixed.train.min_workers, fixed.train.max_workers, fixed.train.elastic) == (2, 2, False)
    for bad in ("[3, 1]", "[0, 2]", "[1, 2, 3]", "[1.5, 2]"):
        with pytest.raises(ConfigError, match="train.num_workers"):
            load_config(None, [f"train.num_workers={bad}"])


def test_keep_per_worker_scales_the_lr_with_the_world_size():
    config = _config()
    assert [worker_batch_size(config, w) for w in (1, 2, 4)] == [8, 8, 8]
    assert [lr_scale(config, w) for w in (1, 2, 4)] == [0.25, 0.5, 1.0]
    # Fewer workers, same per-worker batch: more steps for the same images.
    assert steps_per_epoch(config, 64, 1) == 8 and steps_per_epoch(config, 64, 4) == 2


def test_keep_global_keeps_the_global_batch_and_the_lr():
    config = _config(**{"train.elastic_batch": "keep_global"})  # global batch 8 x 4 = 32
    assert [worker_batch_size(config, w) for w in (1, 2, 3, 4)] == [32, 16, 11, 8]
    assert [lr_scale(config, w) for w in (1, 2, 4)] == [1.0, 1.0, 1.0]
    assert {steps_per_epoch(config, 64, w) for w in (1, 2, 4)} == {2}


def test_a_fixed_world_changes_nothing():
    for mode in ("keep_per_worker", "keep_global"):
        config = Config().with_overrides({"train.elastic_batch": mode})
        assert worker_batch_size(config, 2) == config.train.batch_size
        assert lr_scale(config, 2) == 1.0


def test_scale_lr_rescales_a_restored_schedule():
    """A schedule saved at world size 4 and restored at world size 2 runs at half the lr
    (keep_per_worker), from the restored step, not from the start."""
    train = Config().train
    params = [torch.nn.Parameter(torch.zeros(2))]

    def state():
        opt = torch.optim.SGD(params, lr=train.lr)
        return SimpleNamespace(optimizer=opt, scheduler=build_lr_schedule(opt, train, 100))

    saved = state()
    for _ in range(60):
        saved.optimizer.step()
        saved.scheduler.step()
    full_lr = saved.optimizer.param_groups[0]["lr"]
    restored = state()
    restored.optimizer.load_state_dict(saved.optimizer.state_dict())
    restored.scheduler.load_state_dict(saved.scheduler.state_dict())
    scale_lr(restored, 0.5)
    assert restored.optimizer.param_groups[0]["lr"] == pytest.approx(full_lr * 0.5)
    restored.optimizer.step()
    restored.scheduler.step()
    saved.optimizer.step()
    saved.scheduler.step()
    assert restored.optimizer.param_groups[0]["lr"] == pytest.approx(
        saved.optimizer.param_groups[0]["lr"] * 0.5
    )
    scale_lr(restored, 1.0)  # back to the full world size: the original schedule
    assert restored.optimizer.param_groups[0]["lr"] == pytest.approx(
        saved.optimizer.param_groups[0]["lr"]
    )
