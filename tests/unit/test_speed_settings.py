"""Speed settings of the training workers (no Ray): the memory format rule."""

from __future__ import annotations

import pytest

from pose2seg.config import Config, ConfigError
from workflows.train_loop import use_channels_last


def _cfg(**kw):
    return Config().with_overrides(kw)


def test_channels_last_auto_follows_the_measured_rule():
    assert use_channels_last(_cfg(), threads=1)  # ResNet-18 on one thread: NHWC is faster
    r50 = _cfg(**{"model.backbone_depth": 50})
    assert not use_channels_last(r50, threads=1)  # 1x1 convs on the slow path in NHWC
    assert use_channels_last(r50, threads=2)
    assert use_channels_last(r50.with_overrides({"train.use_gpu": True}), threads=1)
    assert not use_channels_last(_cfg(**{"model.arch": "maskrcnn"}), threads=4)


def test_channels_last_on_and_off_win_over_auto():
    r50 = _cfg(**{"model.backbone_depth": 50, "train.channels_last": "on"})
    assert use_channels_last(r50, threads=1)
    assert not use_channels_last(_cfg(**{"train.channels_last": "off"}), threads=8)
    with pytest.raises(ConfigError, match="train.channels_last"):
        _cfg(**{"train.channels_last": "sometimes"})
