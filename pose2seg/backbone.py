"""ResNet + FPN backbone giving one feature map at stride 4 (the FPN's finest level).

Built from torchvision's ResNet with ``weights=None``, then optionally filled from
``model.pretrained_backbone``: ``imagenet`` (torchvision's weights API, which reads the torch hub
cache ``$TORCH_HOME/hub/checkpoints`` and downloads into it only when the file is missing) or a
local torchvision ResNet state dict (``s3://`` URIs are copied to a local file by the workflows
layer before the model is built). ``model.freeze_backbone_bn`` swaps the ResNet's BatchNorm for
torchvision's ``FrozenBatchNorm2d`` (fixed statistics and affine, as detectron2 does for small
per-GPU batches).

``model.backbone_style = official`` builds the official Pose2Seg code's ResNet-50-FPN
(liruilong940607/Pose2Seg ``modeling/resnet.py``) on the same torchvision modules: the first
block of stages 2..4 strides on its first 1x1 conv (and on the 1x1 projection shortcut, as in
torchvision) instead of the 3x3 conv; the FPN top-down path resizes the coarser map bilinearly
with ``align_corners=False`` (torch 1.0's default for ``F.upsample``); the stride-4 sum goes
through a bare 3x3 conv with bias. The official code's three coarser output convs are never used
by Pose2Seg and are not built. Moving a stride changes no tensor shape, so torchvision's ImageNet
weights load into both styles.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

__all__ = [
    "BACKBONE_STRIDE",
    "BACKBONE_STYLES",
    "IMAGENET",
    "ResNetFPN",
    "imagenet_state_dict",
    "load_backbone_state_dict",
]

BACKBONE_STRIDE: int = 4
"""Input pixels per pixel of the backbone's output feature map."""

IMAGENET: str = "imagenet"
"""``model.pretrained_backbone`` value that asks for torchvision's ImageNet weights."""

BACKBONE_STYLES: tuple[str, ...] = ("ours", "official")
"""Values of ``model.backbone_style``."""

_RESNETS = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
}


class ResNetFPN(nn.Module):
    """ResNet C2..C5 fused top-down into a single stride-4 map of ``fpn_channels`` channels."""

    def __init__(
        self, *, depth: int, fpn_channels: int, frozen_bn: bool = False, style: str = "ours"
    ) -> None:
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(
                f"model.backbone_depth must be one of {sorted(_RESNETS)}, got {depth!r}"
            )
        if style not in BACKBONE_STYLES:
            raise ValueError(
                f"model.backbone_style must be one of {list(BACKBONE_STYLES)}, got {style!r}"
            )
        norm_layer = torchvision.ops.FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        resnet = _RESNETS[depth](weights=None, norm_layer=norm_layer)
        if style == "official":
            _stride_on_first_1x1(resnet)
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
        self.smooth: nn.Module
        if style == "official":
            self.smooth = nn.Conv2d(fpn_channels, fpn_channels, kernel_size=3, padding=1)
        else:
            # Smooths the aliasing of the nearest-neighbour upsampling in the top-down sum.
            self.smooth = nn.Sequential(
                nn.Conv2d(fpn_channels, fpn_channels, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(fpn_channels),
                nn.ReLU(inplace=True),
            )
        self.style = style
        self.depth = depth
        self.frozen_bn = frozen_bn
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
            if self.style == "official":
                up = F.interpolate(top, size=level.shape[-2:], mode="bilinear", align_corners=False)
            else:
                up = F.interpolate(top, size=level.shape[-2:], mode="nearest")
            top = lateral(level) + up
        return self.smooth(top)


def _stride_on_first_1x1(resnet: nn.Module) -> None:
    """Move the stride of every strided bottleneck from its 3x3 conv to its first 1x1 conv
    (the original ResNet / Caffe layout the official code uses); basic blocks are unchanged."""
    for layer in (resnet.layer2, resnet.layer3, resnet.layer4):
        block = layer[0]
        if not isinstance(block, torchvision.models.resnet.Bottleneck):
            continue
        stride = block.conv2.stride
        block.conv1.stride, block.conv2.stride = stride, (1, 1)


def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    bn = getattr(last, "bn3", None) or last.bn2
    return int(bn.weight.shape[0])  # FrozenBatchNorm2d has no num_features


def imagenet_state_dict(depth: int) -> dict[str, torch.Tensor]:
    """torchvision's ``ResNet{depth}_Weights.IMAGENET1K_V1`` state dict, through its weights API.

    The API reads ``$TORCH_HOME/hub/checkpoints/<file name of the URL>`` when it exists and
    downloads it there otherwise (on a machine with internet).
    """
    if depth not in _RESNETS:
        raise ValueError(f"model.backbone_depth must be one of {sorted(_RESNETS)}, got {depth!r}")
    weights = getattr(torchvision.models, f"ResNet{depth}_Weights").IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - network / cache errors all mean the same to a user
        raise ValueError(
            f"model.pretrained_backbone: cannot load torchvision's {weights!r} ({weights.url}) "
            f"from the torch hub cache or the network: {exc}. Without internet, place the file "
            f"under $TORCH_HOME/hub/checkpoints/ or give a local state dict path"
        ) from exc


def _read_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    key = "model.pretrained_backbone"
    if "://" in path:
        raise ValueError(
            f"{key}: {path!r} is a URI; pose2seg loads local files only (the workflows copy "
            "s3:// weights to a local file before building the model)"
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
    return loaded


def load_backbone_state_dict(backbone: ResNetFPN, source: str) -> None:
    """Fill the ResNet part of ``backbone`` from ``source``: ``imagenet`` or a local file.

    ``fc.*`` keys (the classifier) are ignored, and so are ``num_batches_tracked`` buffers
    (absent from older checkpoints and from frozen BatchNorm); any other missing, unexpected or
    wrongly shaped key raises ``ValueError`` naming ``model.pretrained_backbone``, the source
    and the keys.
    """
    key = "model.pretrained_backbone"
    if source == IMAGENET:
        loaded = imagenet_state_dict(backbone.depth)
    else:
        loaded = _read_state_dict_file(source)
    state = {
        k: v
        for k, v in loaded.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    own = backbone.state_dict()
    expected = {
        k for k in backbone.resnet_parameters_names() if not k.endswith("num_batches_tracked")
    }
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    wrong_shape = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in expected & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{key}: {source!r} does not match a torchvision resnet{backbone.depth} state dict "
            f"(model.backbone_depth={backbone.depth}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shapes {wrong_shape[:5]}{'...' if len(wrong_shape) > 5 else ''}"
        )
    backbone.load_state_dict(state, strict=False)
