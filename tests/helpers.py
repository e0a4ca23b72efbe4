"""Helpers shared by the integration tests."""

from __future__ import annotations

from pose2seg.config import Config


def tiny_config(tmp_path, **extra) -> Config:
    """A model and dataset small enough for a 2-core CI machine, every part still real."""
    overrides = {
        "data.root": str(tmp_path / "synthetic"),
        "data.processed": str(tmp_path / "processed"),
        "data.input_size": 96,
        "data.images_per_shard": 8,
        "data.synthetic_num_train": 16,
        "data.synthetic_num_val": 8,
        "data.synthetic_image_size": 96,
        "data.synthetic_max_people": 3,
        "model.backbone_depth": 18,
        "model.fpn_channels": 16,
        "model.roi_size": 16,
        "model.num_residual_units": 1,
        "model.seg_channels": 8,
        "model.num_templates": 2,
        "train.num_workers": 2,
        "train.cpus_per_worker": 0.5,
        "train.epochs": 2,
        "train.batch_size": 4,
        "train.warmup_steps": 2,
        "train.storage_path": str(tmp_path / "runs"),
        "registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "registry.model_name": "pose2seg-test",
        "eval.batch_size": 4,
    }
    overrides.update(extra)
    return Config().with_overrides(overrides)
