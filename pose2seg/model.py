"""The Pose2Seg network: ResNet-FPN features, Affine-Align, skeleton features, SegModule.

``build_model`` builds the network of ``model.arch``; the Mask R-CNN baseline's own parts live
in :mod:`pose2seg.maskrcnn`, and :mod:`pose2seg.arch` is where each architecture's parts meet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pose2seg.backbone import ResNetFPN, load_backbone_state_dict
from pose2seg.config import ModelConfig
from pose2seg.ops import align_features
from pose2seg.paper_geometry import align_features_official
from pose2seg.skeleton import NUM_SKELETON_CHANNELS, skeleton_channels

__all__ = [
    "BottleneckUnit",
    "Pose2Seg",
    "ResidualUnit",
    "SegModule",
    "count_parameters",
]


class ResidualUnit(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut (ResNet's basic block)."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        # Each unit starts as the identity, so a deep stack trains from scratch as a shallow one.
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (P,C,s,s) -> (P,C,s,s)."""
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(x + y, inplace=True)


class BottleneckUnit(nn.Module):
    """1x1 -> 3x3 -> 1x1 conv-BN with a shortcut (ResNet's bottleneck; the official SegModule's).

    The shortcut is a 1x1 conv-BN projection when the input and output widths differ.
    ``official=True``: every conv has a bias and the last BatchNorm keeps PyTorch's default
    init (the official SegModule); otherwise convs have no bias and the residual branch starts
    at zero.
    """

    def __init__(
        self, *, in_channels: int, mid_channels: int, out_channels: int, official: bool = False
    ) -> None:
        super().__init__()
        bias = official
        self.conv1 = nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, mid_channels, kernel_size=3, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, out_channels, kernel_size=1, bias=bias)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias),
                nn.BatchNorm2d(out_channels),
            )
        if not official:
            # As in ResidualUnit: the residual branch starts at zero.
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (P,C_in,s,s) -> (P,C_out,s,s)."""
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        y = self.bn3(self.conv3(y))
        return F.relu(self.shortcut(x) + y, inplace=True)


class SegModule(nn.Module):
    """Pose2Seg's SegModule: 7x7 stride-2 conv, residual units, bilinear x2, one unit, 1x1 conv.

    At S = 64 with 10 units the receptive field is about 50 aligned pixels, enough to see a
    whole limb (paper, Sec. 3.3). ``block="basic"``: basic units of width ``channels``;
    ``block="bottleneck"``: the official layout, bottleneck units of middle width ``channels``
    and output ``4 * channels`` (256 -> 1024 at the official width), the unit after the
    upsampling of middle width ``channels / 2`` and output ``2 * channels``.
    ``head="two_class"``: two output maps whose difference is the logit, so that BCE on it is
    the official 2-class cross-entropy.
    ``style="official"`` (``model.seg_style``; needs ``block="bottleneck"``, ``head="two_class"``):
    the official module (liruilong940607/Pose2Seg ``modeling/seg_module.py``): every conv with a
    bias, PyTorch's default init, x2 upsampling with ``align_corners=True``
    (``nn.UpsamplingBilinear2d``).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        channels: int,
        num_residual_units: int,
        block: str = "basic",
        head: str = "logit",
        style: str = "ours",
    ) -> None:
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"model.seg_block must be 'basic' or 'bottleneck', got {block!r}")
        if head not in ("logit", "two_class"):
            raise ValueError(f"model.mask_head must be 'logit' or 'two_class', got {head!r}")
        if style not in ("ours", "official"):
            raise ValueError(f"model.seg_style must be 'ours' or 'official', got {style!r}")
        official = style == "official"
        if official and (block, head) != ("bottleneck", "two_class"):
            raise ValueError(
                "model.seg_style=official needs model.seg_block=bottleneck and "
                f"model.mask_head=two_class, got {block!r} and {head!r}"
            )
        self.align_corners = official
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=7, stride=2, padding=3, bias=official),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        if block == "basic":
            self.units = nn.Sequential(
                *(ResidualUnit(channels=channels) for _ in range(num_residual_units))
            )
            self.refine: nn.Module = ResidualUnit(channels=channels)
            out = channels
        else:
            wide = 4 * channels
            self.units = nn.Sequential(
                *(
                    BottleneckUnit(
                        in_channels=channels if i == 0 else wide,
                        mid_channels=channels,
                        out_channels=wide,
                        official=official,
                    )
                    for i in range(num_residual_units)
                )
            )
            out = 2 * channels
            self.refine = BottleneckUnit(
                in_channels=wide,
                mid_channels=max(1, channels // 2),
                out_channels=out,
                official=official,
            )
        self.two_class = head == "two_class"
        self.head = nn.Conv2d(out, 2 if self.two_class else 1, kernel_size=1)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (P,C_in,S,S) -> the head's raw maps (P,2,S,S) (two_class: background, person)
        or (P,1,S,S)."""
        y = self.units(self.stem(x))
        y = F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=self.align_corners)
        return self.head(self.refine(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (P,C_in,S,S) aligned features + skeleton -> logits (P,S,S)."""
        y = self.head_logits(x)
        # Softmax over (background, person) is sigmoid of the difference of their logits.
        return y[:, 1] - y[:, 0] if self.two_class else y[:, 0]


class Pose2Seg(nn.Module):
    """Detection-free instance segmentation from poses (Zhang et al., CVPR 2019)."""

    def __init__(self, *, config: ModelConfig) -> None:
        super().__init__()
        if config.arch != "pose2seg":
            raise ValueError(f"model.arch must be 'pose2seg' for Pose2Seg, got {config.arch!r}")
        self.config = config
        self.roi_size = config.roi_size
        self.backbone = ResNetFPN(
            depth=config.backbone_depth,
            fpn_channels=config.fpn_channels,
            frozen_bn=config.freeze_backbone_bn,
            style=config.backbone_style,
        )
        if config.pretrained_source:
            load_backbone_state_dict(self.backbone, config.pretrained_source)
        channels = skeleton_channels(config.skeleton_features)
        self.uses_all_skeleton_channels = len(channels) == NUM_SKELETON_CHANNELS
        # A buffer so the index follows the model to its device.
        self.register_buffer(
            "skeleton_index", torch.tensor(channels, dtype=torch.long), persistent=False
        )
        self.seg = SegModule(
            in_channels=config.fpn_channels + len(channels),
            channels=config.seg_channels,
            num_residual_units=config.num_residual_units,
            block=config.seg_block,
            head=config.mask_head,
            style=config.seg_style,
        )

    def forward(
        self,
        images: torch.Tensor,
        batch_index: torch.Tensor,
        affines: torch.Tensor,
        skeleton: torch.Tensor | None,
    ) -> torch.Tensor:
        """Mask logits of every person in the aligned frame.

        Args:
            images: (B,3,H,W) normalised images in the padded input frame.
            batch_index: (P,) long, the image of each person.
            affines: (P,2,3) input frame -> aligned frame.
            skeleton: (P,55,S,S) all skeleton channels (the model picks those of
                ``model.skeleton_features``); may be None only when that is ``none``.

        Returns:
            logits: (P,S,S). P = 0 gives (0,S,S), still connected to every parameter.
        """
        size = self.roi_size
        features = self.backbone(images)
        # model.roi_geometry: the official sampling (index convention, torch 1.0 semantics).
        align = (
            align_features_official if self.config.roi_geometry == "official" else align_features
        )
        aligned = align(features, batch_index, affines, roi_size=size, stride=self.backbone.stride)
        if self.skeleton_index.numel() > 0:
            if skeleton is None:
                raise ValueError(
                    f"skeleton is None but model.skeleton_features={self.config.skeleton_features!r} "
                    "needs the (P, 55, S, S) skeleton features"
                )
            expected = (affines.shape[0], NUM_SKELETON_CHANNELS, size, size)
            if affines.shape[0] == 0 and skeleton.shape[0] == 0:
                # Batches without people may carry shapeless empties (S unknown to the decoder).
                skeleton = aligned.new_zeros(expected)
            if tuple(skeleton.shape) != expected:
                raise ValueError(
                    f"skeleton must have shape {expected} (P, 55, S, S), got {tuple(skeleton.shape)}"
                )
            picked = (
                skeleton if self.uses_all_skeleton_channels else skeleton[:, self.skeleton_index]
            )
            aligned = torch.cat([aligned, picked.to(aligned.dtype)], dim=1)
        return self.seg(aligned)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
