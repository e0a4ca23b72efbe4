"""configs/paper.yaml (the official recipe, issue 15) through ``workflows/train.py`` on CPU at
tiny scale: every paper setting reaches the workers and the MLflow params; nothing downloads."""

from __future__ import annotations

from pathlib import Path

import pytest

from pose2seg.config import load_config

pytestmark = pytest.mark.integration

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper.yaml"

# The paper settings the run must log (MLflow params are strings), as configs/paper.yaml says.
PAPER_SETTINGS = {
    "model.pretrained_backbone": "none",  # overridden: tests never download
    "model.seg_block": "bottleneck",
    "model.mask_head": "two_class",
    "model.backbone_style": "official",
    "model.seg_style": "official",
    "model.skeleton_rendering": "official",
    "model.template_shape": "aspect_kept",
    "model.mirror_templates": "True",
    "model.align_transform": "similarity",
    "model.hidden_keypoints": "negative",
    "model.heatmap_sigma_px": "3.0",
    "model.paf_width_px": "1.0",
    "model.mask_threshold": "0.5",
    "model.exclusive_masks": "False",
    "train.optimizer": "adam",
    "train.lr": "0.0002",
    "train.weight_decay": "0.0",
    "train.warmup_start_factor": "0.3333333333333333",
    "train.schedule": "step",
    "train.step_milestones": "[0.6, 0.8]",
    "train.dice_weight": "0.0",
    "train.augment_rotation_deg": "30.0",
    "train.augment_scale": "0.2",
    "train.augment_shift": "0.1",
    "train.batch_size": "4",
    # The official geometry (issue 24, docs/paper_geometry.md).
    "data.input_frame": "official",
    "model.templates_file": "configs/official_templates.json",
    "model.template_scale": "1.0",
    "model.template_selection": "official",
    "model.unlabelled_people": "whole_image",
    "model.roi_geometry": "official",
    "model.mask_score": "one",
}

TINY = {
    "data.source": "synthetic",
    "data.train_annotations": "annotations/person_keypoints_train.json",
    "data.train_images": "images/train",
    "data.val_annotations": "annotations/person_keypoints_val.json",
    "data.val_images": "images/val",
    "data.input_size": 96,
    "data.images_per_shard": 8,
    "data.synthetic_num_train": 12,
    "data.synthetic_num_val": 4,
    "data.synthetic_image_size": 96,
    "data.synthetic_max_people": 3,
    "data.max_reject_fraction": 0.5,
    "model.backbone_depth": 18,
    "model.fpn_channels": 16,
    "model.roi_size": 16,
    "model.num_residual_units": 1,
    "model.seg_channels": 8,
    "model.pretrained_backbone": "none",
    "train.use_gpu": "false",
    "train.cpus_per_worker": 0.5,
    "train.epochs": 1,
    "train.warmup_steps": 2,
    "eval.batch_size": 4,
    "registry.model_name": "pose2seg-paper-test",
}


def test_paper_config_is_the_official_recipe():
    config = load_config(str(PAPER))
    assert config.model.pretrained_backbone == "imagenet"
    assert (config.model.backbone_depth, config.model.fpn_channels, config.model.roi_size) == (
        50,
        256,
        64,
    )
    assert (config.train.epochs, config.train.warmup_steps) == (25, 1000)
    assert config.train.num_workers * config.train.batch_size == 4  # 4 images per step
    assert "pose2seg" in config.data.train_annotations  # the COCOPersons subset files


def test_train_py_runs_the_paper_recipe_and_logs_every_setting(ray_session, tmp_path, capsys):
    from mlflow import MlflowClient

    from workflows.train import main

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = {
        **TINY,
        "data.root": str(tmp_path / "synthetic"),
        "data.processed": str(tmp_path / "processed"),
        "train.storage_path": str(tmp_path / "runs"),
        "eval.output_dir": str(tmp_path / "outputs"),
        "registry.tracking_uri": tracking,
    }
    argv = ["--config", str(PAPER)]
    argv += [arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}")]
    assert main(argv) == 0
    assert "val segm AP" in capsys.readouterr().out

    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("pose2seg-paper")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    wrong = {k: (params.get(k), v) for k, v in PAPER_SETTINGS.items() if params.get(k) != v}
    assert not wrong, f"MLflow params differ from the paper recipe: {wrong}"
    assert client.get_metric_history(run.info.run_id, "train_loss")
    # The official template layout reached the model artifact: 3 templates + 3 mirrors.
    import numpy as np

    from pose2seg.checkpoint import load_checkpoint

    ckpt_dirs = sorted(p.parent for p in (tmp_path / "runs").rglob("checkpoint_*/model.pt"))
    assert ckpt_dirs
    loaded = load_checkpoint(str(ckpt_dirs[-1]))
    assert np.asarray(loaded.templates).shape[0] == 6
    assert loaded.config.model.seg_block == "bottleneck"
