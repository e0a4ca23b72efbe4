"""The official Pose2Seg weights (liruilong940607/Pose2Seg) on our paper-mode network.

The official release (``pose2seg_release.pkl``) is a ``torch.save``'d state dict of the official
``Pose2Seg`` module: ``backbone.*`` (its ResNet-50-FPN) and ``segnet.*`` (its SegModule). It
loads into :class:`pose2seg.model.Pose2Seg` built with the official structure
(:data:`OFFICIAL_MODEL_KEYS`: ``model.backbone_style = official``, ``model.seg_style =
official``, ResNet-50, 256 FPN channels, the 10-unit bottleneck SegModule at S = 64, two-class
head, all 55 skeleton channels) after:

- renames: ``conv4`` / ``bn4`` (the official ResNet's projection shortcut) -> ``downsample.0/1``;
  ``fpn_c{k}p{k}`` -> ``lateral.{k-1}``; ``fpn_p1`` -> ``smooth``; ``segnet.conv1`` / ``bn1``
  -> ``seg.stem.0/1``; ``segnet.layer1.{i}`` -> ``seg.units.{i}``; ``segnet.decoder1.0`` ->
  ``seg.refine``; ``downsample`` -> ``shortcut``; ``segnet.pred_small`` -> ``seg.head``;
- the skeleton input channels of ``segnet.conv1`` (input channels 256..310) reordered from the
  official order to ours with the sign of the 4 reversed leg limbs flipped
  (:func:`pose2seg.skeleton.official_skeleton_channel_map`);
- the three coarser FPN output convs (``fpn_p2..4``), which Pose2Seg never uses, dropped;
- a ``module.`` prefix (a DataParallel save) stripped, and ``pose2seg.seg_branch.`` read as
  ``segnet.`` (the official ``Pose2Seg.init`` does the same rename).

``num_batches_tracked`` buffers may be absent on either side (older torch, frozen BatchNorm).
Anything else missing, unexpected or mis-shaped raises :class:`OfficialWeightsError` with one
line naming the tensors.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping

import torch
from torch import nn

from pose2seg.config import ModelConfig
from pose2seg.skeleton import NUM_SKELETON_CHANNELS, official_skeleton_channel_map

__all__ = [
    "OFFICIAL_MODEL_KEYS",
    "OfficialWeightsError",
    "check_official_model_config",
    "load_official_weights",
    "map_official_state_dict",
    "official_name_to_ours",
    "read_official_checkpoint",
]

OFFICIAL_MODEL_KEYS: dict[str, object] = {
    "arch": "pose2seg",
    "backbone_depth": 50,
    "fpn_channels": 256,
    "backbone_style": "official",
    "roi_size": 64,
    "seg_block": "bottleneck",
    "seg_channels": 256,
    "num_residual_units": 10,
    "mask_head": "two_class",
    "seg_style": "official",
    "skeleton_features": "both",
}
"""``model.*`` values of the network the official weights belong to."""

_DROPPED = re.compile(r"^backbone\.fpn_p[234]\.(weight|bias)$")
_SKELETON_CONV = "seg.stem.0.weight"


class OfficialWeightsError(ValueError):
    """An official checkpoint is unreadable or does not match the official network."""


def check_official_model_config(model: ModelConfig) -> None:
    """Raise :class:`OfficialWeightsError` naming every ``model.*`` key that differs from
    :data:`OFFICIAL_MODEL_KEYS`."""
    wrong = [
        f"model.{k}={getattr(model, k)!r} (needs {v!r})"
        for k, v in OFFICIAL_MODEL_KEYS.items()
        if getattr(model, k) != v
    ]
    if wrong:
        raise OfficialWeightsError(
            "the official weights need the official network; the config has " + ", ".join(wrong)
        )


def official_name_to_ours(name: str) -> str | None:
    """Our state-dict key of an official one (prefixes already stripped); None for a tensor
    that is dropped on purpose (the unused FPN levels). Unknown names come back unchanged
    (they then show up as unexpected)."""
    if _DROPPED.match(name):
        return None
    if name.startswith("backbone."):
        out = re.sub(r"\.conv4\.", ".downsample.0.", name)
        out = re.sub(r"\.bn4\.", ".downsample.1.", out)
        out = re.sub(
            r"^backbone\.fpn_c([1-4])p\1\.",
            lambda m: f"backbone.lateral.{int(m.group(1)) - 1}.",
            out,
        )
        out = re.sub(r"^backbone\.fpn_p1\.", "backbone.smooth.", out)
        return out
    if name.startswith("segnet."):
        out = re.sub(r"^segnet\.conv1\.", "seg.stem.0.", name)
        out = re.sub(r"^segnet\.bn1\.", "seg.stem.1.", out)
        out = re.sub(r"^segnet\.layer1\.", "seg.units.", out)
        out = re.sub(r"^segnet\.decoder1\.0\.", "seg.refine.", out)
        out = re.sub(r"^segnet\.pred_small\.", "seg.head.", out)
        out = out.replace(".downsample.", ".shortcut.")
        return out
    return name


def _strip_prefixes(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module.") :]
    if name.startswith("pose2seg.seg_branch."):
        name = "segnet." + name[len("pose2seg.seg_branch.") :]
    return name


def _preview(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"


def map_official_state_dict(
    official: Mapping[str, torch.Tensor], model: nn.Module, *, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The official state dict as our ``model``'s state dict (see the module docstring).

    Args:
        official: name -> tensor of the official model (``module.`` prefix allowed).
        model: our paper-mode :class:`pose2seg.model.Pose2Seg` (gives the expected names and
            shapes).
        source: named in the error message.

    Raises:
        OfficialWeightsError: one line listing missing, unexpected and mis-shaped tensors.
    """
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for raw_name, tensor in official.items():
        name = _strip_prefixes(raw_name)
        ours = official_name_to_ours(name)
        if ours is None:
            continue
        if ours not in own:
            if not ours.endswith("num_batches_tracked"):
                unexpected.append(raw_name)
            continue
        mapped[ours] = tensor
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    wrong = [
        f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        raise OfficialWeightsError(
            f"{source} does not match the official Pose2Seg network: "
            f"missing {_preview(missing)}, unexpected {_preview(unexpected)}, "
            f"wrong shapes {_preview(wrong)}"
        )
    conv = mapped.get(_SKELETON_CONV)
    if conv is not None:
        mapped[_SKELETON_CONV] = _reorder_skeleton_inputs(conv)
    # Keep our own buffers where the checkpoint has none (num_batches_tracked).
    for k, v in own.items():
        mapped.setdefault(k, v)
    return {k: mapped[k].detach().clone().to(own[k].dtype) for k in own}


def _reorder_skeleton_inputs(weight: torch.Tensor) -> torch.Tensor:
    """(O, F + 55, kh, kw): the last 55 input channels from the official order to ours."""
    index, sign = official_skeleton_channel_map()
    features = weight.shape[1] - NUM_SKELETON_CHANNELS
    out = weight.clone()
    for c, (i, s) in enumerate(zip(index, sign, strict=True)):
        out[:, features + i] = s * weight[:, features + c]
    return out


def load_official_weights(
    model: nn.Module, official: Mapping[str, torch.Tensor], *, source: str = "checkpoint"
) -> None:
    """Fill our paper-mode ``model`` with the official weights (strict)."""
    if hasattr(model, "config"):
        check_official_model_config(model.config)
    model.load_state_dict(map_official_state_dict(official, model, source=source))


def read_official_checkpoint(data: bytes, *, source: str) -> dict[str, torch.Tensor]:
    """The state dict in the bytes of a ``torch.save``'d file (the official
    ``pose2seg_release.pkl``), read with ``weights_only=True`` (no code runs). A
    ``{"state_dict": ...}`` wrapper is accepted.

    Raises:
        OfficialWeightsError: naming ``source``: unreadable or truncated file, not a mapping of
            names to tensors.
    """
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every unreadable file is the same user error
        detail = " ".join(str(exc).split())[:200]
        raise OfficialWeightsError(
            f"{source} is not a readable torch checkpoint (wrong or truncated file?): {detail}"
        ) from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not loaded:
        raise OfficialWeightsError(
            f"{source} holds {type(loaded).__name__}, not a state dict (name -> tensor)"
        )
    bad = [str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise OfficialWeightsError(
            f"{source}: not a state dict, these entries are not tensors: {_preview(bad)}"
        )
    return dict(loaded)
