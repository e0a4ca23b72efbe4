"""The one typed, validated configuration of the whole workflow.

Sections: ``data``, ``model``, ``train``, ``tune``, ``eval``, ``registry``, ``detector``,
``serve``. Every field has a flattened dotted key (``model.roi_size``, ``train.lr``) that is at
once the YAML key, the ``--set key=value`` override, the MLflow param name and the Tune
search-space key. An unknown key or a bad value raises :class:`ConfigError` naming the key,
before any cluster work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid; the message names the key."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: Any, key: str, choices: tuple) -> None:
    _check(value in choices, key, f"must be one of {list(choices)}, got {value!r}")


PRECISIONS: tuple[str, ...] = ("auto", "gpu", "bf16", "fp16", "fp32")
"""Values of the ``*.mixed_precision`` keys (resolved per device by :mod:`pose2seg.precision`)."""

_PRECISION_ALIASES = {
    "true": "gpu",
    "yes": "gpu",
    "1": "gpu",
    "false": "fp32",
    "no": "fp32",
    "0": "fp32",
}


def precision_setting(value: Any, key: str) -> str:
    """A ``*.mixed_precision`` value as one of :data:`PRECISIONS`; the booleans of the former
    boolean key still load with their former meaning (true = gpu, false = fp32). Raises
    ConfigError naming the key."""
    if isinstance(value, bool):
        return "gpu" if value else "fp32"
    if isinstance(value, str):
        lowered = value.strip().lower()
        lowered = _PRECISION_ALIASES.get(lowered, lowered)
        if lowered in PRECISIONS:
            return lowered
    raise ConfigError(f"{key}: must be one of {list(PRECISIONS)}, got {value!r}")


@dataclass
class DataConfig:
    """Where the raw dataset lives, how it is preprocessed and where the Parquet goes."""

    source: str = "synthetic"
    """``synthetic`` (generated if absent under ``root``) or ``coco`` (any COCO-format person
    keypoint dataset: COCO, OCHuman, ...)."""
    root: str = "data/synthetic"
    """Dataset root, a local path or ``s3://bucket/prefix``. Relative paths below resolve here."""
    train_annotations: str = "annotations/person_keypoints_train.json"
    """COCO keypoint JSON of the training split (relative to ``root`` unless absolute/URI)."""
    train_images: str = "images/train"
    """Folder of training images (relative to ``root`` unless absolute/URI)."""
    val_annotations: str = "annotations/person_keypoints_val.json"
    """COCO keypoint JSON of the validation split."""
    val_images: str = "images/val"
    """Folder of validation images."""
    processed: str = "data/processed"
    """Root of the preprocessed Parquet (local or s3://); a variant folder per preprocessing key."""
    input_size: int = 160
    """Images are resized so their longer side is this many pixels and padded to a square
    (the CPU default trades resolution for speed; COCO runs use 512)."""
    image_encoding: str = "png"
    """How images are stored in Parquet: ``png`` (lossless) or ``jpeg``."""
    images_per_shard: int = 32
    """Images per Ray Data preprocessing task / Parquet file."""
    max_reject_fraction: float = 0.5
    """Preprocessing fails if more than this fraction of people is rejected."""
    keypoint_margin_fraction: float = 0.25
    """A person with a labelled keypoint farther than this fraction of the image's longer side
    outside the image is rejected (``keypoints_outside_image``), in preprocessing and inference."""
    synthetic_num_train: int = 1440
    """Synthetic generator: number of training images."""
    synthetic_num_val: int = 120
    """Synthetic generator: number of validation images."""
    synthetic_image_size: int = 256
    """Synthetic generator: image side in pixels."""
    synthetic_max_people: int = 4
    """Synthetic generator: at most this many people per image (at least 1)."""
    synthetic_overlap: float = 0.88
    """Synthetic generator, train split: 0 = people placed apart, 1 = people stacked on each other."""
    synthetic_val_overlap: float = 0.88
    """Synthetic generator, val split (every val image has >= 2 people): heavy occlusion."""
    synthetic_seed: int = 0
    """Synthetic generator seed; the dataset is a pure function of the synthetic_* keys."""
    input_frame: str = "ours"
    """How an image and its keypoints enter the input frame: ``ours`` (resized so the longer
    side is ``data.input_size``, antialiased, pasted top-left) or ``official`` (the official
    code: keypoints truncated to integers, the image centred in the ``input_size`` square and
    resampled by OpenCV's ``warpAffine``, bilinear without antialiasing; pixel centres on
    integers). See docs/paper_geometry.md."""

    def validate(self) -> None:
        _one_of(self.source, "data.source", ("synthetic", "coco"))
        _one_of(self.image_encoding, "data.image_encoding", ("png", "jpeg"))
        _one_of(self.input_frame, "data.input_frame", ("ours", "official"))
        _check(32 <= self.input_size <= 2048, "data.input_size", "must be in [32, 2048]")
        _check(self.images_per_shard >= 1, "data.images_per_shard", "must be >= 1")
        _check(
            0.0 <= self.max_reject_fraction <= 1.0, "data.max_reject_fraction", "must be in [0, 1]"
        )
        _check(
            0.0 <= self.keypoint_margin_fraction <= 10.0,
            "data.keypoint_margin_fraction",
            "must be in [0, 10]",
        )
        _check(self.synthetic_num_train >= 1, "data.synthetic_num_train", "must be >= 1")
        _check(self.synthetic_num_val >= 1, "data.synthetic_num_val", "must be >= 1")
        _check(self.synthetic_image_size >= 64, "data.synthetic_image_size", "must be >= 64")
        _check(self.synthetic_max_people >= 1, "data.synthetic_max_people", "must be >= 1")
        _check(0.0 <= self.synthetic_overlap <= 1.0, "data.synthetic_overlap", "must be in [0, 1]")
        _check(
            0.0 <= self.synthetic_val_overlap <= 1.0,
            "data.synthetic_val_overlap",
            "must be in [0, 1]",
        )


@dataclass
class ModelConfig:
    """The network and the options the ablations search."""

    arch: str = "pose2seg"
    """``pose2seg``, or ``maskrcnn`` for the torchvision Mask R-CNN baseline."""
    backbone_depth: int = 18
    """ResNet depth of the backbone: 18, 34 or 50 (paper: 50)."""
    fpn_channels: int = 64
    """Channels of the FPN outputs (paper: 256)."""
    pretrained_backbone: str = ""
    """ResNet weights: empty or ``none`` = from scratch; ``imagenet`` = torchvision's ImageNet
    weights through its weights API (the torch hub cache, downloaded once on a machine with
    internet); or a local path / ``s3://`` URI of a torchvision ResNet state dict."""
    freeze_backbone_bn: bool = False
    """Freeze the ResNet's BatchNorm (statistics and affine; torchvision's FrozenBatchNorm2d),
    as detectron2 does for pretrained backbones and small per-GPU batches."""
    roi_size: int = 48
    """S: side of the aligned RoI in pixels (paper: 64; the CPU default uses 48)."""
    num_residual_units: int = 10
    """Residual units of the SegModule before upsampling (paper: 10)."""
    seg_channels: int = 32
    """Width of the SegModule (the CPU default is narrow for speed)."""
    skeleton_features: str = "both"
    """Skeleton features concatenated to the aligned features: both, paf, heatmaps or none."""
    num_templates: int = 3
    """Number of pose templates fitted by k-means on the training poses."""
    alignment: str = "pose"
    """``pose``: affine onto the best pose template; ``box``: the bounding-box baseline."""
    align_transform: str = "affine"
    """Transform of the pose alignment: ``affine`` (full affine) or ``similarity`` (rotation,
    uniform scale, shift; the official code)."""
    template_shape: str = "stretched"
    """Fitted templates: ``stretched`` (each axis fills the frame) or ``aspect_kept`` (the
    official code)."""
    mirror_templates: bool = False
    """Cluster the training poses with their mirror images and add each template's left-right
    label-swapped copy (official: 3 templates + 3 mirrors)."""
    templates_file: str = ""
    """Path or URI of templates in the official ``templates.json`` layout, used instead of
    fitting (``model.num_templates`` and ``model.template_shape`` are then ignored)."""
    template_scale: float = 1.1
    """Scale of the ``model.templates_file`` coordinates around the frame centre (official code
    at the fixture's commit: 1.0; ours 1.1, an older official commit's factor)."""
    template_selection: str = "ours"
    """How each person's template (RoI) is chosen: ``ours`` (weighted fit, see
    pose2seg/templates.py) or ``official`` (the official search: similarity fit by OpenCV's
    float32 SVD with all labelled keypoints alike, score mean(exp(-err)) x shared/union joints,
    a template taken only if its score beats the best so far and its scale exceeds the
    whole-image scale, else the whole input frame; ``model.align_transform``,
    ``model.fallback`` and ``model.fallback_min_size`` are then not used). See
    docs/paper_geometry.md."""
    unlabelled_people: str = "drop"
    """People with no labelled keypoint (all v = 0): ``drop`` (rejected in preprocessing, no
    prediction) or ``whole_image`` (the network's output over the whole-image RoI, as the
    official code)."""
    roi_geometry: str = "ours"
    """Sub-pixel conventions of the RoI: ``ours`` (pixel centres at +0.5, ``grid_sample`` with
    ``align_corners=False`` both ways) or ``official`` (pixel centres on integers, the official
    RoI sampling with its (F - 1) / F translation, the inverse warp by OpenCV's
    ``warpAffine``, training targets warped by OpenCV as the official loss does). See
    docs/paper_geometry.md."""
    hidden_keypoints: str = "negative"
    """Heatmap of a hidden (v = 1) keypoint: ``negative`` (the official code; the default since
    the ablation of issue 15) or ``positive`` like a visible one."""
    seg_block: str = "basic"
    """Residual unit of the SegModule: ``basic`` (two 3x3 convs, width seg_channels) or
    ``bottleneck`` (1x1 -> 3x3 -> 1x1, width seg_channels, output 4 x seg_channels; the
    official code with seg_channels = 256)."""
    mask_head: str = "logit"
    """Mask output: ``logit`` (one logit, BCE) or ``two_class`` (two logits and their
    difference, so BCE equals the official 2-class cross-entropy)."""
    heatmap_sigma_px: float = 3.0
    """Std of the keypoint confidence Gaussians, in aligned-frame pixels at S = 64 (scales with S)."""
    paf_width_px: float = 1.0
    """Half-width of a limb in the part affinity fields, aligned-frame pixels at S = 64."""
    mask_threshold: float = 0.4
    """Probability above which a warped-back mask pixel belongs to the person."""
    exclusive_masks: bool = True
    """Visible masks do not overlap: a pixel claimed by several people of an image goes to the
    one with the highest probability (false: each person's mask on its own, as in the paper)."""
    mask_score: str = "mean_prob"
    """Score of a predicted mask: ``mean_prob`` (mean probability inside the mask) or ``one``
    (every mask scores 1, as the official Pose2Seg code does)."""
    fallback: str = "keypoints"
    """RoI of people whose keypoints cannot define the affine (< 3 usable or collinear):
    ``keypoints`` (sized from the person's own keypoints, see pose2seg/fallback.py) or ``image``
    (the whole image letterboxed into the RoI, as the official code does)."""
    fallback_min_size: float = 0.25
    """``keypoints`` fallback: smallest RoI side, as a fraction of the image's longer side."""
    backbone_style: str = "ours"
    """ResNet-FPN variant: ``ours`` (torchvision's ResNet, stride on the 3x3 conv; nearest
    top-down upsampling; output 3x3 conv + BN + ReLU) or ``official`` (the official code: stride
    on the first 1x1 conv and its projection shortcut, bilinear top-down upsampling with
    align_corners=False, output a bare 3x3 conv with bias). One key: they only matter together
    for loading the official weights. Both load torchvision ImageNet weights (same shapes)."""
    seg_style: str = "ours"
    """SegModule variant: ``ours`` (convs without bias, upsampling align_corners=False, last BN
    of each unit zero-initialised) or ``official`` (every conv with a bias, upsampling
    align_corners=True, PyTorch's default init; needs ``seg_block: bottleneck`` and
    ``mask_head: two_class``)."""
    skeleton_rendering: str = "ours"
    """Rule drawing the skeleton features: ``ours`` (pixel centres at +0.5, limbs clipped at the
    segment ends, width ``paf_width_px``) or ``official`` (pixel centres on integer indices,
    heatmaps cut at d < 4.6025, limbs: pixels of the endpoints' box +-1 px whose distance to
    the limb's line is < ``paf_width_px``)."""

    @property
    def pretrained_source(self) -> str:
        """``model.pretrained_backbone`` with ``none`` read as empty (train from scratch)."""
        return (
            "" if self.pretrained_backbone.strip().lower() == "none" else self.pretrained_backbone
        )

    def validate(self) -> None:
        _one_of(self.arch, "model.arch", ("pose2seg", "maskrcnn"))
        _one_of(self.backbone_depth, "model.backbone_depth", (18, 34, 50))
        _check(8 <= self.fpn_channels <= 1024, "model.fpn_channels", "must be in [8, 1024]")
        _check(
            self.roi_size >= 16 and self.roi_size % 4 == 0,
            "model.roi_size",
            f"must be a multiple of 4 and >= 16, got {self.roi_size}",
        )
        _check(self.num_residual_units >= 1, "model.num_residual_units", "must be >= 1")
        _check(self.seg_channels >= 8, "model.seg_channels", "must be >= 8")
        _one_of(
            self.skeleton_features, "model.skeleton_features", ("both", "paf", "heatmaps", "none")
        )
        _check(1 <= self.num_templates <= 64, "model.num_templates", "must be in [1, 64]")
        _one_of(self.alignment, "model.alignment", ("pose", "box"))
        _one_of(self.align_transform, "model.align_transform", ("affine", "similarity"))
        _one_of(self.template_shape, "model.template_shape", ("stretched", "aspect_kept"))
        _one_of(self.hidden_keypoints, "model.hidden_keypoints", ("positive", "negative"))
        _check(0.0 < self.template_scale <= 4.0, "model.template_scale", "must be in (0, 4]")
        _one_of(self.template_selection, "model.template_selection", ("ours", "official"))
        _one_of(self.unlabelled_people, "model.unlabelled_people", ("drop", "whole_image"))
        _one_of(self.roi_geometry, "model.roi_geometry", ("ours", "official"))
        _one_of(self.seg_block, "model.seg_block", ("basic", "bottleneck"))
        _one_of(self.mask_head, "model.mask_head", ("logit", "two_class"))
        if self.templates_file and "://" not in self.templates_file:
            _check(
                os.path.isfile(self.templates_file),
                "model.templates_file",
                f"no such file {self.templates_file!r}",
            )
        _check(self.heatmap_sigma_px > 0, "model.heatmap_sigma_px", "must be > 0")
        _check(self.paf_width_px > 0, "model.paf_width_px", "must be > 0")
        _check(0.0 < self.mask_threshold < 1.0, "model.mask_threshold", "must be in (0, 1)")
        _one_of(self.mask_score, "model.mask_score", ("mean_prob", "one"))
        _one_of(self.fallback, "model.fallback", ("keypoints", "image"))
        _one_of(self.backbone_style, "model.backbone_style", ("ours", "official"))
        _one_of(self.seg_style, "model.seg_style", ("ours", "official"))
        _one_of(self.skeleton_rendering, "model.skeleton_rendering", ("ours", "official"))
        if self.seg_style == "official":
            _check(
                self.seg_block == "bottleneck" and self.mask_head == "two_class",
                "model.seg_style",
                "official needs model.seg_block=bottleneck and model.mask_head=two_class, got "
                f"{self.seg_block!r} and {self.mask_head!r}",
            )
        _check(0.0 < self.fallback_min_size <= 2.0, "model.fallback_min_size", "must be in (0, 2]")
        if (
            self.pretrained_source
            and self.pretrained_source != "imagenet"
            and ("://" not in self.pretrained_source)
        ):
            _check(
                os.path.isfile(self.pretrained_backbone),
                "model.pretrained_backbone",
                f"no such file {self.pretrained_backbone!r}",
            )


@dataclass
class TrainConfig:
    """Ray Train scaling, optimisation and checkpointing."""

    num_workers: int | list[int] = 2
    """Ray Train workers (DDP ranks): a number, or an elastic range ``[min, max]`` (Ray Train's
    elastic mode: the run starts with what the cluster can place, at least ``min``, shrinks when
    a node is lost and grows back to ``max`` when one joins; see ``train.elastic_batch``)."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker asks for besides its CPUs/GPU, e.g. ``{"trainer": 1}``
    to keep the workers on the nodes started with ``--resources '{"trainer": N}'``."""
    placement_strategy: str = "PACK"
    """How the workers' placement group is laid on the nodes: ``PACK`` (as few nodes as
    possible), ``SPREAD`` (across nodes where possible) or ``STRICT_SPREAD`` (every worker on a
    different node, or the run cannot start)."""
    elastic_batch: str = "keep_per_worker"
    """What a changed world size (an elastic range) does to the batch: ``keep_per_worker`` (each
    worker keeps ``train.batch_size``; the global batch and the lr scale with the world size:
    lr x world / max workers, the linear scaling rule) or ``keep_global`` (the global batch
    ``train.batch_size`` x max workers is kept: each worker takes ``ceil(global / world)``
    images per step; the lr is unchanged). A fixed ``train.num_workers`` never changes either."""
    elastic_resize_interval_s: float = 60.0
    """Elastic range: how often Ray Train looks for room to grow the worker group (a resize
    restarts the workers from the last checkpoint)."""
    placement_timeout_s: float = 900.0
    """How long a run (or a Tune trial) waits, in all, for the cluster to place its Train workers
    (a node lost and not replaced, resources held by other jobs) before it fails with one line
    naming what it asked for and what the cluster has; Ray Train retries the placement every
    ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s) until then. 0 = wait as long as it takes
    (Ray's own behaviour: a fixed-size run whose workers are never placed waits forever). An
    elastic range only tries once Ray sees room for its minimum, so its wait for that room is
    not bounded by this. One attempt lasts ``train.placement_attempt_s``."""
    placement_attempt_s: float = 0.0
    """How long one attempt of Ray Train to place the worker group waits before it gives up
    and decides again (Ray Train's ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, set for this
    run's controller); 0 = Ray's own setting (that variable, else 60 s). After a lost node an
    elastic run first retries at its old size (Ray's view of the cluster still holds the lost
    node, for up to half a minute) and waits one whole attempt before it goes on smaller: on a
    cluster whose nodes are there or not (no autoscaler starting them) 15 s recovers sooner
    (a lost node cost 75 s with 60, 45 s with 15: docs/cluster_multinode.md#measured)."""
    check_resources: bool = True
    """Refuse, before fitting, a request the cluster's nodes can never hold (a worker bigger than
    every node, more workers than fit, no CPU left for the Ray Data reads) and a local storage
    path on a multi-node cluster. Turn off on an autoscaling cluster whose nodes join later."""
    shared_filesystem: bool = False
    """Local paths (``data.root``, ``data.processed``, ``train.storage_path``, a SQLite MLflow
    store) are on a file system every node mounts at the same path (NFS, Lustre): allow them on
    a multi-node cluster. False: such a run is refused at start (use s3:// and an MLflow server)."""
    use_gpu: bool = False
    """One GPU per worker when true."""
    cpus_per_worker: float = 0.5
    """CPUs each worker asks for; leave some for Ray Data (a worker holding every CPU starves it)."""
    torch_threads: int = 0
    """CPU threads of each worker's torch ops; 0 = ``round(cpus_per_worker)`` (at least 1). Ray
    schedules by ``cpus_per_worker``; a lone worker on a small machine may use more threads than
    it reserves (the Ray Data tasks beside it are light)."""
    epochs: int = 8
    """Training epochs."""
    batch_size: int = 8
    """Images per worker per step."""
    optimizer: str = "adamw"
    """``adamw``, ``adam`` (L2 weight decay as in torch.optim.Adam; the official code: Adam,
    lr 2e-4, weight decay 0) or ``sgd``."""
    lr: float = 2e-3
    """Peak learning rate after warm-up."""
    weight_decay: float = 1e-4
    """Weight decay."""
    momentum: float = 0.9
    """SGD momentum (ignored by AdamW)."""
    warmup_steps: int = 50
    """Linear warm-up steps from ``warmup_start_factor`` x lr to lr."""
    warmup_start_factor: float = 0.1
    """The lr multiplier warm-up starts from (official: 1/3)."""
    schedule: str = "cosine"
    """After warm-up: ``cosine`` (to 1% of lr), ``step`` (x0.1 at each of ``step_milestones``)
    or ``constant``."""
    step_milestones: list[float] = field(default_factory=lambda: [2 / 3, 8 / 9])
    """Fractions of training at which the ``step`` schedule multiplies the lr by 0.1 (official:
    [0.6, 0.8])."""
    augment_rotation_deg: float = 0.0
    """Per-person training augmentation: random rotation of the alignment in +-this many degrees
    (official: 30; 0 = off). Features and targets are re-rendered for the perturbed transform."""
    augment_scale: float = 0.0
    """Per-person random scale of the alignment in [1 - x, 1 + x] (official: 0.2; 0 = off)."""
    augment_shift: float = 0.0
    """Per-person random shift of the alignment, a fraction of the RoI side per axis (official:
    0.1; 0 = off)."""
    occlusion_keypoint_prob: float = 0.0
    """Point-wise occlusion of the skeleton input: each usable keypoint is dropped (v = 0) with
    this probability (0 = off)."""
    occlusion_box_prob: float = 0.0
    """Area occlusion of the skeleton input: with this probability per person, every keypoint
    inside a random box of the RoI is dropped (0 = off)."""
    dice_weight: float = 1.0
    """Weight of a per-person soft Dice term added to the per-pixel BCE mask loss (0 = BCE only)."""
    grad_clip_norm: float = 5.0
    """Clip the global gradient norm to this value (0 disables)."""
    mixed_precision: str = "auto"
    """Training precision: ``auto`` (autocast on a GPU: bf16 where supported, else fp16 +
    GradScaler; bf16 autocast on a CPU with native bf16 — AMX-BF16, AVX512-BF16 or Arm BF16;
    fp32 on other CPUs), ``gpu`` (as ``auto`` but fp32 on every CPU), ``bf16``, ``fp16`` or
    ``fp32``. ``auto`` became the default once bf16's AP on CPU was measured against fp32
    (docs/TRAINING.md, Precision). Master weights and the loss stay fp32. The choice and its reason are printed once and
    logged as the MLflow params ``train.precision_resolved`` / ``train.precision_reason``."""
    seed: int = 0
    """Seed of model init and data order."""
    storage_path: str = "runs"
    """Ray Train/Tune storage for checkpoints: a local path or s3://."""
    run_name: str = ""
    """Ray Train run name; empty = a new unique name. Reuse a name (with --resume) to continue it."""
    max_failures: int = 2
    """Worker failures Ray Train recovers from (restarting from the last checkpoint)."""
    num_to_keep: int = 2
    """Checkpoints kept in storage."""
    shuffle_buffer_size: int = 256
    """Rows in each worker's seeded local shuffle buffer (on top of the per-epoch seeded file
    order); capped at the worker's rows per epoch; 0 = file order only."""
    input_reader: str = "thread"
    """How a training worker reads its Parquet slices: ``thread`` (a background thread of the
    worker, pyarrow, local or s3://) or ``ray_data`` (Ray Data read tasks anywhere in the
    cluster; in Ray 2.60 its scheduling thread spins inside the worker while the reads are held
    back by backpressure, costing the training steps CPU). Same rows, same order."""
    read_concurrency: int = 1
    """Parquet slices read ahead per training worker (``ray_data``: read tasks in flight; the
    ``thread`` reader keeps at least 2 ahead)."""
    progress_every_steps: int = 0
    """Print a progress line (rank 0) every this many steps; 0 = by time only."""
    progress_every_seconds: float = 30.0
    """Print a progress line (rank 0) at least this often inside an epoch; 0 = by steps only."""
    mlflow_loss_every_steps: int = 10
    """Log the training step loss (``step_loss``) to MLflow every this many steps; 0 = off."""
    init_weights: str = ""
    """Start training from these whole-model weights (empty: from ``model.pretrained_backbone``
    only): a checkpoint folder (local or ``s3://``) or a registered model ``models:/NAME@ALIAS``
    / ``runs:/...`` (e.g. the official weights imported by ``workflows/import_weights.py``).
    Its network must match the config's model keys. Ignored when resuming a run."""

    def validate(self) -> None:
        if isinstance(self.num_workers, list):
            _check(
                len(self.num_workers) == 2 and 1 <= self.num_workers[0] <= self.num_workers[1],
                "train.num_workers",
                f"a range must be [min, max] with 1 <= min <= max, got {self.num_workers}",
            )
        else:
            _check(self.num_workers >= 1, "train.num_workers", "must be >= 1")
        _check(
            isinstance(self.worker_resources, dict)
            and all(
                isinstance(v, int | float) and not isinstance(v, bool) and v > 0
                for v in self.worker_resources.values()
            )
            and not {"CPU", "GPU"} & set(self.worker_resources),
            "train.worker_resources",
            "must map custom resource names (not CPU/GPU: train.cpus_per_worker, train.use_gpu) "
            f"to amounts > 0, got {self.worker_resources!r}",
        )
        _one_of(
            self.placement_strategy, "train.placement_strategy", ("PACK", "SPREAD", "STRICT_SPREAD")
        )
        _one_of(self.elastic_batch, "train.elastic_batch", ("keep_per_worker", "keep_global"))
        _check(self.elastic_resize_interval_s > 0, "train.elastic_resize_interval_s", "must be > 0")
        _check(self.placement_timeout_s >= 0, "train.placement_timeout_s", "must be >= 0")
        _check(self.placement_attempt_s >= 0, "train.placement_attempt_s", "must be >= 0")
        _one_of(self.mixed_precision, "train.mixed_precision", PRECISIONS)
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker", "must be > 0")
        _check(self.torch_threads >= 0, "train.torch_threads", "must be >= 0")
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _one_of(self.optimizer, "train.optimizer", ("adamw", "adam", "sgd"))
        _check(
            0.0 < self.warmup_start_factor <= 1.0, "train.warmup_start_factor", "must be in (0, 1]"
        )
        _check(
            all(0.0 < m < 1.0 for m in self.step_milestones)
            and list(self.step_milestones) == sorted(self.step_milestones),
            "train.step_milestones",
            f"must be increasing fractions in (0, 1), got {self.step_milestones}",
        )
        _check(
            0.0 <= self.augment_rotation_deg <= 180.0,
            "train.augment_rotation_deg",
            "must be in [0, 180]",
        )
        _check(0.0 <= self.augment_scale < 1.0, "train.augment_scale", "must be in [0, 1)")
        _check(0.0 <= self.augment_shift <= 0.5, "train.augment_shift", "must be in [0, 0.5]")
        for key in ("occlusion_keypoint_prob", "occlusion_box_prob"):
            _check(0.0 <= getattr(self, key) <= 1.0, f"train.{key}", "must be in [0, 1]")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _one_of(self.schedule, "train.schedule", ("cosine", "step", "constant"))
        _check(self.grad_clip_norm >= 0, "train.grad_clip_norm", "must be >= 0")
        _check(self.dice_weight >= 0, "train.dice_weight", "must be >= 0")
        _check(self.max_failures >= 0, "train.max_failures", "must be >= 0")
        _check(self.num_to_keep >= 1, "train.num_to_keep", "must be >= 1")
        _check(self.shuffle_buffer_size >= 0, "train.shuffle_buffer_size", "must be >= 0")
        _check(self.read_concurrency >= 1, "train.read_concurrency", "must be >= 1")
        _one_of(self.input_reader, "train.input_reader", ("thread", "ray_data"))
        _check(self.progress_every_steps >= 0, "train.progress_every_steps", "must be >= 0")
        _check(self.progress_every_seconds >= 0, "train.progress_every_seconds", "must be >= 0")
        _check(self.mlflow_loss_every_steps >= 0, "train.mlflow_loss_every_steps", "must be >= 0")

    @property
    def min_workers(self) -> int:
        """The fewest workers the run goes on with (``num_workers`` when it is a number)."""
        return int(self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers)

    @property
    def max_workers(self) -> int:
        """The workers the run asks for (``num_workers`` when it is a number)."""
        return int(self.num_workers[-1] if isinstance(self.num_workers, list) else self.num_workers)

    @property
    def elastic(self) -> bool:
        """True when ``num_workers`` is a range whose min and max differ."""
        return self.min_workers != self.max_workers


@dataclass
class TuneConfig:
    """The Ray Tune ablation search over dotted keys."""

    search_space: dict[str, list] = field(
        default_factory=lambda: {
            "model.skeleton_features": ["both", "none"],
            "model.alignment": ["pose", "box"],
        }
    )
    """Dotted key -> list of values (grid), e.g. ``{"model.roi_size": [32, 64]}``."""
    trials: dict[str, dict] = field(default_factory=dict)
    """Named trials instead of the grid: trial name -> ``{dotted key: value}`` applied on top of
    the config (one-factor-at-a-time ablations, e.g. configs/ablation_paper_vs_ours.yaml);
    when set, ``search_space`` is not used."""
    num_samples: int = 1
    """Repeats of the grid."""
    max_concurrent_trials: int = 1
    """Trials running at once."""
    cpus_per_trial_driver: float = 0.5
    """CPU held by each trial's driver (the workers ask for train.cpus_per_worker on top)."""
    driver_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each trial's driver asks for besides its CPU, e.g. ``{"driver": 1}``
    to keep the drivers (and their Ray Train controllers, which sit on the driver's node) on a
    node started with ``--resources '{"driver": N}'``: a stable head rather than a spot worker,
    so that a lost worker node costs a trial its Train workers only."""
    max_failures: int = 0
    """Times Tune restarts a failed trial (Tune's FailureConfig): a trial whose node is lost
    then continues from its last checkpoint (its Ray Train run and MLflow child run are
    reused). 0 = a failed trial stays failed (a diverging trial fails the same way again)."""
    grace_period: int = 2
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: int = 2
    """ASHA reduction factor."""
    name: str = ""
    """Experiment name under train.storage_path; reuse it to resume a search."""

    def validate(self) -> None:
        _check(isinstance(self.search_space, dict), "tune.search_space", "must be a mapping")
        for key, values in self.search_space.items():
            _check(key in _FIELD_TYPES, f"tune.search_space.{key}", "is not a config key")
            _check(
                not key.startswith("tune."), f"tune.search_space.{key}", "cannot search tune.* keys"
            )
            _check(
                isinstance(values, list) and len(values) >= 1,
                f"tune.search_space.{key}",
                "must be a non-empty list of values",
            )
        _check(isinstance(self.trials, dict), "tune.trials", "must be a mapping")
        for name, overrides in self.trials.items():
            _check(
                isinstance(overrides, dict),
                f"tune.trials.{name}",
                "must be a mapping of config keys to values",
            )
            for key in overrides:
                _check(key in _FIELD_TYPES, f"tune.trials.{name}.{key}", "is not a config key")
                _check(
                    not key.startswith("tune."),
                    f"tune.trials.{name}.{key}",
                    "cannot set tune.* keys",
                )
        _check(self.num_samples >= 1, "tune.num_samples", "must be >= 1")
        _check(self.max_concurrent_trials >= 1, "tune.max_concurrent_trials", "must be >= 1")
        _check(self.cpus_per_trial_driver > 0, "tune.cpus_per_trial_driver", "must be > 0")
        _check(
            isinstance(self.driver_resources, dict)
            and all(
                isinstance(v, int | float) and not isinstance(v, bool) and v > 0
                for v in self.driver_resources.values()
            )
            and not {"CPU", "GPU"} & set(self.driver_resources),
            "tune.driver_resources",
            "must map custom resource names (not CPU/GPU: tune.cpus_per_trial_driver) to "
            f"amounts > 0, got {self.driver_resources!r}",
        )
        _check(self.grace_period >= 1, "tune.grace_period", "must be >= 1")
        _check(self.max_failures >= 0, "tune.max_failures", "must be >= 0")
        _check(self.reduction_factor >= 2, "tune.reduction_factor", "must be >= 2")


@dataclass
class EvalConfig:
    """Evaluation and prediction."""

    keypoints: str = "gt"
    """``gt`` (ground-truth keypoints) or the path/URI of a COCO keypoint-results JSON."""
    batch_size: int = 8
    """Images per inference batch."""
    occlusion_bins: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.5, 0.75, 1.0])
    """MaxIoU bin edges for the AP-by-occlusion breakdown (OCHuman: 0.5-0.75 moderate, >0.75 hard)."""
    occluded_min_iou: float = 0.5
    """People with MaxIoU at least this form the "occluded" subset."""
    keypoint_drop_prob: float = 0.0
    """Robustness evaluation: drop each visible GT keypoint with this probability (hidden ones
    with twice it), as a pose estimator misses joints (0 = exact GT; pose2seg/keypoint_noise.py)."""
    keypoint_jitter: float = 0.0
    """Robustness evaluation: Gaussian error of the kept GT keypoints in OKS units (std = this x
    sqrt(area) x 2 sigma_k; expected keypoint OKS 1 / (1 + x^2)); 0 = exact positions."""
    keypoint_noise_seed: int = 0
    """Seed of the keypoint degradation (draws depend on this and the image id only)."""
    num_overlays: int = 8
    """Overlay PNGs written by evaluate/predict."""
    output_dir: str = "outputs"
    """Where results JSON, tables and overlays are written."""
    max_reject_fraction: float = 0.1
    """evaluate/predict fail if more than this fraction of images is rejected (unreadable or
    unsafe path); below it the rejects are listed in ``rejects.json`` and the job goes on."""
    protocol: str = "ignore"
    """People without any labelled keypoint: ``ignore`` (ignore regions, like crowds; the
    paper's protocol, which evaluates the people that have keypoints) or ``miss`` (they stay
    ground truth a pose-based model never segments: strict). Crowd regions are always ignore
    regions (COCOeval's rule). The same in training-time validation and evaluate.py."""
    splits: dict[str, dict] = field(default_factory=dict)
    """Named evaluation splits: ``{name: {annotations: FILE, images: FOLDER}}`` (relative to
    ``data.root`` unless absolute/URI). ``train`` and ``val`` are always known (the data.*
    keys) unless declared here."""
    default_splits: list[str] = field(default_factory=lambda: ["val"])
    """Splits evaluate.py evaluates when no ``--split`` is given."""
    mixed_precision: str = "fp32"
    """Precision of every batch prediction (training-time validation, evaluate.py, predict.py):
    ``fp32`` (the default), ``auto``, ``gpu``, ``bf16`` or ``fp16``, resolved per device as
    ``train.mixed_precision``."""

    def validate(self) -> None:
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _one_of(self.mixed_precision, "eval.mixed_precision", PRECISIONS)
        bins = self.occlusion_bins
        _check(
            len(bins) >= 2 and all(a < b for a, b in zip(bins, bins[1:], strict=False)),
            "eval.occlusion_bins",
            "must be at least two increasing edges",
        )
        _check(0.0 <= self.occluded_min_iou <= 1.0, "eval.occluded_min_iou", "must be in [0, 1]")
        _check(
            0.0 <= self.keypoint_drop_prob <= 1.0, "eval.keypoint_drop_prob", "must be in [0, 1]"
        )
        _check(self.keypoint_jitter >= 0.0, "eval.keypoint_jitter", "must be >= 0")
        _check(self.num_overlays >= 0, "eval.num_overlays", "must be >= 0")
        _check(
            0.0 <= self.max_reject_fraction <= 1.0, "eval.max_reject_fraction", "must be in [0, 1]"
        )
        _one_of(self.protocol, "eval.protocol", ("ignore", "miss"))
        _check(isinstance(self.splits, dict), "eval.splits", "must be a mapping")
        for name, body in self.splits.items():
            key = f"eval.splits.{name}"
            _check(
                isinstance(name, str) and name.replace("_", "").replace("-", "").isalnum(),
                key,
                "split names are letters, digits, '_' and '-'",
            )
            _check(
                isinstance(body, dict) and set(body) == {"annotations", "images"},
                key,
                f"must be a mapping with exactly 'annotations' and 'images', got {body!r}",
            )
            for part in ("annotations", "images"):
                _check(
                    isinstance(body[part], str) and bool(body[part]),
                    f"{key}.{part}",
                    "must be a non-empty string",
                )
        _check(len(self.default_splits) >= 1, "eval.default_splits", "must name a split")
        known = {"train", "val", *self.splits}
        for name in self.default_splits:
            _check(
                name in known,
                "eval.default_splits",
                f"unknown split {name!r}; known: {sorted(known)}",
            )


@dataclass
class RegistryConfig:
    """MLflow tracking and the model registry."""

    tracking_uri: str = ""
    """MLflow tracking URI; empty = $MLFLOW_TRACKING_URI or a local sqlite:///mlflow.db."""
    experiment: str = "pose2seg"
    """MLflow experiment name."""
    model_name: str = "pose2seg"
    """Registered model name."""
    alias: str = "champion"
    """Alias moved to a new version only when its val AP beats the current holder's."""
    register: bool = True
    """Register the trained model."""

    def validate(self) -> None:
        _check(bool(self.experiment), "registry.experiment", "must not be empty")
        _check(bool(self.model_name), "registry.model_name", "must not be empty")
        _check(bool(self.alias), "registry.alias", "must not be empty")


@dataclass
class DetectorConfig:
    """The keypoint-detector stage: poses for images that come without keypoints."""

    weights: str = "torchvision"
    """Keypoint R-CNN weights: ``torchvision`` (its weights API: the torch hub cache, downloaded
    on a machine with internet) or a local path / ``s3://`` URI of the same state dict."""
    min_size: int = 800
    """The detector resizes images so their shorter side is this (torchvision's default 800)."""
    max_size: int = 1333
    """... and their longer side at most this (torchvision's default 1333)."""
    person_score_threshold: float = 0.5
    """Detected people scoring below this are dropped."""
    keypoint_score_threshold: float = 0.0
    """Heatmap score above which a detected keypoint is usable (v = 2); others get v = 0."""
    max_people: int = 20
    """Most people kept per image."""

    def validate(self) -> None:
        _check(bool(self.weights), "detector.weights", "must not be empty")
        _check(self.min_size >= 32, "detector.min_size", "must be >= 32")
        _check(self.max_size >= self.min_size, "detector.max_size", "must be >= detector.min_size")
        _check(
            0.0 <= self.person_score_threshold <= 1.0,
            "detector.person_score_threshold",
            "must be in [0, 1]",
        )
        _check(self.max_people >= 1, "detector.max_people", "must be >= 1")


@dataclass
class ServeConfig:
    """Online inference with Ray Serve (``workflows/serve.py``)."""

    num_replicas: int = 1
    """Replicas of the model; with autoscaling (``serve.max_replicas`` > 0) the minimum."""
    max_replicas: int = 0
    """0: a fixed ``serve.num_replicas``; otherwise autoscale between the two."""
    target_ongoing_requests: float = 2.0
    """Autoscaling target: requests in flight per replica."""
    cpus_per_replica: float = 1.0
    """CPUs each replica asks Ray for (its torch threads: this, rounded, at least 1)."""
    use_gpu: bool = False
    """One GPU per replica."""
    max_batch_size: int = 8
    """Requests run through the model together (``@serve.batch``)."""
    batch_wait_timeout_s: float = 0.02
    """How long a replica waits to fill a batch."""
    host: str = "127.0.0.1"
    """HTTP host of Ray Serve's proxy (``0.0.0.0`` in a container)."""
    port: int = 8000
    """HTTP port of Ray Serve's proxy."""
    route_prefix: str = "/"
    """URL path of the application."""
    app_name: str = "pose2seg"
    """Ray Serve application name (a redeploy under the same name replaces it)."""
    mixed_precision: str = "fp32"
    """Precision of the Serve replicas (and the MLflow pyfunc): ``fp32`` (the default),
    ``auto``, ``gpu``, ``bf16`` or ``fp16``, resolved per device as ``train.mixed_precision``."""
    max_image_pixels: int = 50_000_000
    """Largest image a request may send, in pixels (width x height as the file's header
    declares it, checked before decoding); a larger one is answered 413. 0: no limit."""
    max_people: int = 100
    """Most people (keypoint sets) one request may give; more is answered 413. 0: no limit."""
    image_roots: list[str] = field(default_factory=list)
    """Folders or ``s3://`` prefixes that a request's ``image_uri`` may read from (a path or
    URI below one of them, or a name relative to the first). Empty (the default):
    ``image_uri`` is refused with 403 and requests send the image bytes."""

    def validate(self) -> None:
        _check(self.num_replicas >= 1, "serve.num_replicas", "must be >= 1")
        _check(
            self.max_replicas == 0 or self.max_replicas >= self.num_replicas,
            "serve.max_replicas",
            "must be 0 (no autoscaling) or >= serve.num_replicas",
        )
        _check(self.target_ongoing_requests > 0, "serve.target_ongoing_requests", "must be > 0")
        _check(self.cpus_per_replica > 0, "serve.cpus_per_replica", "must be > 0")
        _check(self.max_batch_size >= 1, "serve.max_batch_size", "must be >= 1")
        _check(self.batch_wait_timeout_s >= 0, "serve.batch_wait_timeout_s", "must be >= 0")
        _check(1 <= self.port <= 65535, "serve.port", "must be a TCP port")
        _check(self.route_prefix.startswith("/"), "serve.route_prefix", "must start with '/'")
        _check(bool(self.app_name), "serve.app_name", "must not be empty")
        _one_of(self.mixed_precision, "serve.mixed_precision", PRECISIONS)
        _check(self.max_image_pixels >= 0, "serve.max_image_pixels", "must be >= 0 (0: no limit)")
        _check(self.max_people >= 0, "serve.max_people", "must be >= 0 (0: no limit)")
        for root in self.image_roots:
            _check(
                bool(root.strip()) and ("://" not in root or root.startswith("s3://")),
                "serve.image_roots",
                f"{root!r} is not a folder or an s3:// prefix",
            )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "tune": TuneConfig,
    "eval": EvalConfig,
    "registry": RegistryConfig,
    "detector": DetectorConfig,
    "serve": ServeConfig,
}


def _field_types() -> dict[str, Any]:
    types: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            types[f"{section}.{f.name}"] = hints[f.name]
    return types


_FIELD_TYPES: dict[str, Any] = _field_types()

# Keys whose value changes the preprocessed Parquet: each distinct combination is its own
# dataset variant (see :meth:`Config.preprocess_key`).
PREPROCESS_KEYS: tuple[str, ...] = (
    "data.source",
    "data.root",
    "data.train_annotations",
    "data.train_images",
    "data.val_annotations",
    "data.val_images",
    "data.input_size",
    "data.image_encoding",
    "data.keypoint_margin_fraction",
    "data.synthetic_num_train",
    "data.synthetic_num_val",
    "data.synthetic_image_size",
    "data.synthetic_max_people",
    "data.synthetic_overlap",
    "data.synthetic_val_overlap",
    "data.synthetic_seed",
    "model.roi_size",
    "model.num_templates",
    "model.alignment",
    "model.heatmap_sigma_px",
    "model.paf_width_px",
    "model.fallback",
    "model.fallback_min_size",
)

# Preprocessing keys added after variants were already stored: they enter the variant key only
# when they differ from their default, so the Parquet of today's configs keeps its name.
PREPROCESS_KEYS_IF_SET: tuple[str, ...] = (
    "model.align_transform",
    "model.template_shape",
    "model.mirror_templates",
    "model.templates_file",
    "model.hidden_keypoints",
    "model.template_scale",
    "model.template_selection",
    "model.unlabelled_people",
    "model.roi_geometry",
    "data.input_frame",
    "model.skeleton_rendering",
)


# Bump when the preprocessing code changes what it writes (template frame, features, schema):
# old Parquet variants then stop matching instead of being silently reused.
# 4: the default of model.hidden_keypoints (a key that enters the variant key only when it
# differs from the default) changed to negative; old variants must not match the new default.
PREPROCESS_FORMAT_VERSION: int = 4


def _coerce(key: str, value: Any) -> Any:
    """Convert ``value`` to the declared type of ``key`` or raise ConfigError naming the key."""
    typ = _FIELD_TYPES[key]
    origin = typing.get_origin(typ)
    if key.endswith(".mixed_precision"):
        return precision_setting(value, key)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise TypeError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if typ is str:
            if not isinstance(value, str):
                raise TypeError
            return value
        if typ == (int | list[int]):  # train.num_workers: a number or a [min, max] range
            if isinstance(value, list | tuple):
                if any(isinstance(v, bool) or int(v) != v for v in value):
                    raise TypeError
                return [int(v) for v in value]
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if origin is list:
            if not isinstance(value, list):
                raise TypeError
            (inner,) = typing.get_args(typ)
            return [inner(v) for v in value]
        if origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{key}: expected {getattr(typ, '__name__', typ)}, got {value!r}"
        ) from None
    raise ConfigError(f"{key}: unsupported type {typ}")  # pragma: no cover - a bug in this file


@dataclass
class Config:
    """The whole workflow's configuration; build it with :func:`load_config` or :meth:`from_flat`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for section in SECTIONS:
            getattr(self, section).validate()
        # The official conventions build on each other: its input frame and RoI sampling use
        # the index-convention matrices that only the official search computes.
        if self.data.input_frame == "official":
            _check(
                self.model.roi_geometry == "official",
                "data.input_frame",
                "'official' needs model.roi_geometry=official (pixel centres on integers)",
            )
        if self.model.roi_geometry == "official":
            _check(
                self.model.template_selection == "official",
                "model.roi_geometry",
                "'official' needs model.template_selection=official (its index-convention "
                "matrices)",
            )
        if self.model.template_selection == "official":
            _check(
                self.data.input_size % 4 == 0,
                "data.input_size",
                f"must be a multiple of 4 with model.template_selection=official (the feature "
                f"frame is the input / 4), got {self.data.input_size}",
            )

    def to_flat(self) -> dict[str, Any]:
        """``{"model.roi_size": 64, ...}`` for every key (lists and dicts kept as values)."""
        flat: dict[str, Any] = {}
        for section in SECTIONS:
            for f in dataclasses.fields(getattr(self, section)):
                flat[f"{section}.{f.name}"] = getattr(getattr(self, section), f.name)
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> Config:
        """Build from dotted keys; missing keys take their defaults, unknown keys raise."""
        values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for key, value in flat.items():
            if key not in _FIELD_TYPES:
                raise ConfigError(f"{key}: unknown config key{_suggest(key)}")
            section, name = key.split(".", 1)
            values[section][name] = _coerce(key, value)
        sections = {}
        for section, cls_ in SECTIONS.items():
            obj = cls_(**values[section])
            sections[section] = obj
        return cls(**sections)

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A new, validated config with ``overrides`` (dotted keys) applied."""
        flat = self.to_flat()
        flat.update(overrides)
        return Config.from_flat(flat)

    def preprocess_key(self) -> str:
        """A short hash of the keys that change the preprocessed data (names a Parquet variant)."""
        flat = self.to_flat()
        defaults = Config.to_flat(_DEFAULTS)
        keys = list(PREPROCESS_KEYS)
        keys += [k for k in PREPROCESS_KEYS_IF_SET if flat[k] != defaults[k]]
        payload = json.dumps(
            {"format": PREPROCESS_FORMAT_VERSION, **{k: flat[k] for k in keys}},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested ``{section: {field: value}}``, the YAML layout."""
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}


_DEFAULTS = Config()


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(_FIELD_TYPES), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def flatten_nested(nested: dict[str, Any], *, source: str = "config") -> dict[str, Any]:
    """Turn YAML's ``{section: {field: value}}`` into dotted keys, rejecting unknown sections."""
    flat: dict[str, Any] = {}
    if not isinstance(nested, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections {list(SECTIONS)}")
    for section, body in nested.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{section}: unknown config section in {source}; sections are {list(SECTIONS)}"
            )
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: must be a mapping in {source}")
        for name, value in body.items():
            flat[f"{section}.{name}"] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``key=value`` override; the value is read as YAML (``true``, ``3``, ``[1, 2]``)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in _FIELD_TYPES:
        raise ConfigError(f"{key}: unknown config key{_suggest(key)}")
    value = yaml.safe_load(raw) if raw.strip() else ""
    if _FIELD_TYPES[key] is str and not isinstance(value, str):
        value = raw  # "--set registry.alias=2024" stays a string
    return key, value


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (optional) and apply ``key=value`` overrides; validate everything."""
    import yaml

    flat: dict[str, Any] = {}
    if path:
        try:
            with open(path) as fh:
                nested = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from None
        flat.update(flatten_nested(nested, source=path))
    for text in overrides or []:
        key, value = parse_override(text)
        flat[key] = value
    return Config.from_flat(flat)
