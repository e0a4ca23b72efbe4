"""``train.init_weights``: training starts from a whole model's weights (a checkpoint folder,
e.g. the official weights imported by ``workflows/import_weights.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pose2seg.arch import build_model
from pose2seg.checkpoint import save_checkpoint
from tests.helpers import tiny_config
from workflows.train_input import init_weights_state, load_init_weights


def _saved(tmp_path, config):
    torch.manual_seed(1)
    model = build_model(config.model)
    directory = save_checkpoint(
        str(tmp_path / "ckpt"),
        model=model,
        config=config,
        templates=np.zeros((2, 17, 2), np.float32),
    )
    return model, directory


def test_training_starts_from_the_init_weights(tmp_path):
    config = tiny_config(tmp_path)
    source, directory = _saved(tmp_path, config)
    assert init_weights_state(config) is None  # the default: nothing to load
    config = config.with_overrides({"train.init_weights": directory})
    torch.manual_seed(2)
    model = build_model(config.model)
    assert not torch.equal(model.seg.head.weight, source.seg.head.weight)
    load_init_weights(model, init_weights_state(config), ref=directory)
    expected = source.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_init_weights_errors_name_the_key(tmp_path):
    config = tiny_config(tmp_path)
    _, directory = _saved(tmp_path, config)
    missing = config.with_overrides({"train.init_weights": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match=r"^train.init_weights: cannot read the weights of"):
        init_weights_state(missing)
    other = build_model(config.with_overrides({"model.seg_channels": 16}).model)
    state = init_weights_state(config.with_overrides({"train.init_weights": directory}))
    with pytest.raises(ValueError, match=r"train.init_weights: .* does not match .*wrong shapes"):
        load_init_weights(other, state, ref=directory)
