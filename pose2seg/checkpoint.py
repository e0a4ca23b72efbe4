"""The on-disk checkpoint format: model weights, the config, the pose templates, training state.

A checkpoint is a folder (Ray Train uploads it to local or s3:// storage as it is):
``model.pt`` (state dict of the unwrapped model), ``config.json`` (flat dotted keys),
``templates.npy`` ((T, K, 2) float32, unit aligned coordinates), ``state.json`` (epoch, step,
metrics) and, for resuming, ``training.pt`` (optimiser, LR schedule and AMP scaler states).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pose2seg.config import Config

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
TEMPLATES_FILE = "templates.npy"
STATE_FILE = "state.json"
TRAINING_FILE = "training.pt"


class CheckpointError(ValueError):
    """A checkpoint folder is missing a file or holds something unreadable."""


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns."""

    config: Config
    templates: np.ndarray  # (T, K, 2) float32
    model_state: dict[str, torch.Tensor]
    state: dict[str, Any] = field(default_factory=dict)
    training_state: dict[str, Any] | None = None


def save_checkpoint(
    directory: str,
    *,
    model: torch.nn.Module,
    config: Config,
    templates: np.ndarray,
    state: dict[str, Any] | None = None,
    training_state: dict[str, Any] | None = None,
) -> str:
    """Write a checkpoint folder; ``model`` may be DDP-wrapped (its ``.module`` is saved)."""
    os.makedirs(directory, exist_ok=True)
    unwrapped = getattr(model, "module", model)
    torch.save(
        {k: v.detach().cpu() for k, v in unwrapped.state_dict().items()},
        os.path.join(directory, MODEL_FILE),
    )
    flat = config.to_flat()
    # A local pretrained-weights path means nothing on another machine, and the weights are in
    # model.pt anyway: drop it so the checkpoint's config validates wherever it is loaded.
    flat["model.pretrained_backbone"] = ""
    # Likewise the templates file: its templates are saved beside the weights (templates.npy).
    flat["model.templates_file"] = ""
    with open(os.path.join(directory, CONFIG_FILE), "w") as fh:
        json.dump(flat, fh, indent=1, sort_keys=True)
    np.save(os.path.join(directory, TEMPLATES_FILE), np.asarray(templates, dtype=np.float32))
    with open(os.path.join(directory, STATE_FILE), "w") as fh:
        json.dump(state or {}, fh, indent=1, sort_keys=True, default=float)
    if training_state is not None:
        torch.save(training_state, os.path.join(directory, TRAINING_FILE))
    return directory


def _read(path: str, read):
    """``read(path)``; any failure (a truncated zip, bad JSON, a short .npy) becomes one
    CheckpointError naming the file."""
    try:
        return read(path)
    except CheckpointError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint file {path} is unreadable ({type(exc).__name__}: {reason})"
        ) from exc


def _read_json(path: str) -> Any:
    with open(path) as fh:
        return json.load(fh)


def load_checkpoint(directory: str, *, with_training_state: bool = False) -> LoadedCheckpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: a file is missing, or unreadable (the message names the file).
    """
    for name in (MODEL_FILE, CONFIG_FILE, TEMPLATES_FILE):
        if not os.path.isfile(os.path.join(directory, name)):
            raise CheckpointError(f"checkpoint {directory!r} has no {name}")
    config = Config.from_flat(_read(os.path.join(directory, CONFIG_FILE), _read_json))
    templates = _read(os.path.join(directory, TEMPLATES_FILE), np.load).astype(np.float32)
    model_state = _read(
        os.path.join(directory, MODEL_FILE),
        lambda p: torch.load(p, map_location="cpu", weights_only=True),
    )
    state: dict[str, Any] = {}
    state_path = os.path.join(directory, STATE_FILE)
    if os.path.isfile(state_path):
        state = _read(state_path, _read_json)
    training_state = None
    training_path = os.path.join(directory, TRAINING_FILE)
    if with_training_state and os.path.isfile(training_path):
        training_state = _read(
            training_path, lambda p: torch.load(p, map_location="cpu", weights_only=False)
        )
    return LoadedCheckpoint(
        config=config,
        templates=templates,
        model_state=model_state,
        state=state,
        training_state=training_state,
    )
