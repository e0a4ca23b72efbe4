"""ResNet + FPN backbone giving one feature map at stride 4 (the FPN's finest level).

Built from torchvision's ResNet with ``weights=None``: weights are trained from scratch unless
the user supplies a local state dict. Nothing here downloads anything.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

__all__ = ["BACKBONE_STRIDE", "ResNetFPN", "load_backbone_state_dict"]

BACKBONE_STRIDE: int = 4
"""Input pixels per pixel of the backbone's output feature map."""

_RESNETS = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
}


class ResNetFPN(nn.Module):
    """ResNet C2..C5 fused top-down into a single stride-4 map of ``fpn_channels`` channels."""

    def __init__(self, *, depth: int, fpn_channels: int) -> None:
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(
                f"model.backbone_depth must be one of {sorted(_RESNETS)}, got {depth!r}"
            )
        resnet = _RESNETS[depth](weights=None)
        # Kept as the ResNet's own attribute names so torchvision ResNet state dicts load as is.
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        in_channels = [
            _out_channels(layer) for layer in (self.layer1, self.layer2, self.layer3, self.layer4)
        ]
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn_channels, kernel_size=1) for c in in_channels)
        # Smooths the aliasing of the nearest-neighbour upsampling in the top-down sum.
        self.smooth = nn.Sequential(
            nn.Conv2d(fpn_channels, fpn_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(fpn_channels),
            nn.ReLU(inplace=True),
        )
        self.depth = depth
        self.out_channels = fpn_channels
        self.stride = BACKBONE_STRIDE

    def resnet_parameters_names(self) -> list[str]:
        """State-dict keys that come from the torchvision ResNet (what a pretrained file fills)."""
        return [k for k in self.state_dict() if not k.startswith(("lateral.", "smooth."))]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B,3,H,W) normalised -> features (B,F,ceil(H/4),ceil(W/4))."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        top = self.lateral[3](c5)
        for level, lateral in ((c4, self.lateral[2]), (c3, self.lateral[1]), (c2, self.lateral[0])):
            # Sizes, not a x2 factor: odd input sizes give maps of size ceil(n/2) per level.
            top = lateral(level) + F.interpolate(top, size=level.shape[-2:], mode="nearest")
        return self.smooth(top)


def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    bn = getattr(last, "bn3", None) or last.bn2
    return bn.num_features


def load_backbone_state_dict(backbone: ResNetFPN, path: str) -> None:
    """Fill the ResNet part of ``backbone`` from a local torchvision ResNet state dict.

    ``fc.*`` keys (the classifier) are ignored; any other missing, unexpected or wrongly shaped
    key raises ``ValueError`` naming ``model.pretrained_backbone``, the file and the keys.
    """
    key = "model.pretrained_backbone"
    if "://" in path:
        raise ValueError(
            f"{key}: {path!r} is a URI; pose2seg loads local files only (copy it locally first)"
        )
    if not os.path.isfile(path):
        raise ValueError(f"{key}: no such file {path!r}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"{key}: cannot read {path!r} as a torch state dict: {exc}") from exc
    if (
        isinstance(loaded, dict)
        and "state_dict" in loaded
        and isinstance(loaded["state_dict"], dict)
    ):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise ValueError(
            f"{key}: {path!r} does not hold a state dict (a mapping of name -> tensor)"
        )
    state = {k: v for k, v in loaded.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    expected = set(backbone.resnet_parameters_names())
    # Older torchvision checkpoints predate BatchNorm's num_batches_tracked buffer.
    missing = sorted(k for k in expected - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - expected)
    wrong_shape = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in expected & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{key}: {path!r} does not match a torchvision resnet{backbone.depth} state dict "
            f"(model.backbone_depth={backbone.depth}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shapes {wrong_shape[:5]}{'...' if len(wrong_shape) > 5 else ''}"
        )
    backbone.load_state_dict(state, strict=False)
