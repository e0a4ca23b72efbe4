"""The Pose2Seg network: shapes for every option, gradients, P = 0, pretrained weights, batches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torchvision

from pose2seg.arch import build_model
from pose2seg.batch import collate
from pose2seg.config import ModelConfig
from pose2seg.loss import check_finite, dice_loss, mask_loss
from pose2seg.model import Pose2Seg, count_parameters
from pose2seg.skeleton import NUM_KEYPOINTS, NUM_SKELETON_CHANNELS

torch.set_num_threads(2)

# Small but real: every option is exercised at a size that keeps the test fast on 2 cores.
SMALL = ModelConfig(
    backbone_depth=18, fpn_channels=16, seg_channels=16, num_residual_units=2, roi_size=32
)
INPUT = 64


def inputs(config: ModelConfig, people_per_image=(2, 1), *, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    size = config.roi_size
    num_images = len(people_per_image)
    images = torch.randn(num_images, 3, INPUT, INPUT, generator=gen)
    batch_index = torch.cat(
        [torch.full((n,), b, dtype=torch.long) for b, n in enumerate(people_per_image)]
    )
    num_people = int(batch_index.shape[0])
    # Each person: a box of ~40 px around a random centre scaled into the RoI.
    scale = size / 40.0
    centres = torch.rand(num_people, 2, generator=gen) * 30 + 17
    affines = torch.zeros(num_people, 2, 3)
    affines[:, 0, 0] = scale
    affines[:, 1, 1] = scale
    affines[:, :, 2] = size / 2 - scale * centres
    skeleton = torch.rand(num_people, NUM_SKELETON_CHANNELS, size, size, generator=gen)
    return images, batch_index, affines, skeleton


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"backbone_depth": 34},
        {"backbone_depth": 50, "fpn_channels": 32},
        {"roi_size": 64},
        {"num_residual_units": 1},
        {"num_residual_units": 4},
        {"skeleton_features": "paf"},
        {"skeleton_features": "heatmaps"},
        {"skeleton_features": "none"},
        {"alignment": "box"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_output_shapes_for_every_option(overrides):
    config = dataclasses.replace(SMALL, **overrides)
    model = build_model(config)
    images, batch_index, affines, skeleton = inputs(config)
    if config.skeleton_features == "none":
        skeleton = None
    logits = model(images, batch_index, affines, skeleton)
    assert logits.shape == (3, config.roi_size, config.roi_size)
    assert torch.isfinite(logits).all()


def test_skeleton_features_change_the_input_width():
    widths = {}
    for mode in ("both", "paf", "heatmaps", "none"):
        model = Pose2Seg(config=dataclasses.replace(SMALL, skeleton_features=mode))
        widths[mode] = model.seg.stem[0].in_channels
    assert widths == {"both": 16 + 55, "paf": 16 + 38, "heatmaps": 16 + 17, "none": 16}


def test_alignment_modes_share_the_same_network():
    pose = Pose2Seg(config=SMALL)
    box = Pose2Seg(config=dataclasses.replace(SMALL, alignment="box"))
    assert count_parameters(pose) == count_parameters(box)
    assert [k for k in pose.state_dict()] == [k for k in box.state_dict()]


def test_paf_mode_reads_only_paf_channels():
    model = Pose2Seg(config=dataclasses.replace(SMALL, skeleton_features="paf")).eval()
    images, batch_index, affines, skeleton = inputs(SMALL)
    changed = skeleton.clone()
    changed[:, 38:] = 0.0  # heatmap channels are ignored in "paf" mode
    with torch.no_grad():
        assert torch.equal(
            model(images, batch_index, affines, skeleton),
            model(images, batch_index, affines, changed),
        )
        changed[:, :38] = 0.0
        assert not torch.equal(
            model(images, batch_index, affines, skeleton),
            model(images, batch_index, affines, changed),
        )


def test_missing_or_misshaped_skeleton_raises():
    model = Pose2Seg(config=SMALL)
    images, batch_index, affines, skeleton = inputs(SMALL)
    with pytest.raises(ValueError, match="skeleton is None"):
        model(images, batch_index, affines, None)
    with pytest.raises(ValueError, match=r"\(P, 55, S, S\)"):
        model(images, batch_index, affines, skeleton[:, :, :16, :16])


def test_images_without_people_give_empty_logits_and_zero_loss_that_backprops():
    model = Pose2Seg(config=SMALL).train()
    images, _, _, _ = inputs(SMALL)
    logits = model(
        images, torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, 3), torch.zeros(0, 55, 32, 32)
    )
    assert logits.shape == (0, 32, 32)
    loss = mask_loss(logits, torch.zeros(0, 32, 32))
    assert float(loss.detach()) == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads), "every parameter must get a (zero) gradient for DDP"
    assert all(float(g.abs().sum()) == 0.0 for g in grads)


def test_gradients_reach_the_first_backbone_conv():
    model = Pose2Seg(config=SMALL).train()
    images, batch_index, affines, skeleton = inputs(SMALL)
    loss = mask_loss(model(images, batch_index, affines, skeleton), torch.rand(3, 32, 32) > 0.5)
    loss.backward()
    grad = model.backbone.conv1.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0.0


def test_mask_loss_value_and_checks():
    logits = torch.zeros(2, 4, 4)
    assert float(mask_loss(logits, torch.ones(2, 4, 4))) == pytest.approx(np.log(2.0))
    with pytest.raises(ValueError, match="targets must have the shape"):
        mask_loss(logits, torch.ones(2, 3, 3))
    with pytest.raises(FloatingPointError, match="step 7"):
        check_finite(torch.tensor(float("nan")), step=7)
    check_finite(torch.tensor(1.0), step=0)


def test_dice_term_scores_whole_masks():
    targets = torch.zeros(2, 8, 8)
    targets[:, 2:6, 2:6] = 1.0
    right = torch.where(targets > 0, 20.0, -20.0)
    # Hand-computed: a perfect mask scores (2*16 + 1) / (16 + 16 + 1) = 1, so the loss is 0.
    assert float(dice_loss(right, targets)) == pytest.approx(0.0, abs=1e-6)
    # The complement: no overlap, so 1 - 1 / (48 + 16 + 1).
    assert float(dice_loss(-right, targets)) == pytest.approx(1.0 - 1.0 / 65.0, abs=1e-6)
    # Half the person predicted: dice = (2*8 + 1) / (8 + 16 + 1).
    half = right.clone()
    half[:, 2:4, :] = -20.0
    assert float(dice_loss(half, targets)) == pytest.approx(1.0 - 17.0 / 25.0, abs=1e-6)
    logits = torch.zeros(2, 8, 8, requires_grad=True)
    bce = mask_loss(logits, targets)
    both = mask_loss(logits, targets, dice_weight=0.5)
    assert float(both) == pytest.approx(float(bce) + 0.5 * float(dice_loss(logits, targets)))
    both.backward()
    assert float(logits.grad.abs().sum()) > 0.0
    # P = 0 stays an exact zero with the Dice term on.
    assert float(mask_loss(torch.zeros(0, 8, 8), torch.zeros(0, 8, 8), dice_weight=1.0)) == 0.0


def test_pretrained_backbone_loads_from_a_local_file(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    model = Pose2Seg(config=dataclasses.replace(SMALL, pretrained_backbone=str(path)))
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(
        model.backbone.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var
    )


def test_mismatched_pretrained_backbone_raises(tmp_path):
    path = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="model.pretrained_backbone.*resnet18"):
        Pose2Seg(config=dataclasses.replace(SMALL, pretrained_backbone=str(path)))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="model.pretrained_backbone"):
        Pose2Seg(config=dataclasses.replace(SMALL, pretrained_backbone=str(junk)))


def test_maskrcnn_baseline_constructor():
    model = build_model(dataclasses.replace(SMALL, arch="maskrcnn"), input_size=INPUT)
    assert isinstance(model, torchvision.models.detection.MaskRCNN)
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    assert count_parameters(model) > 0


def decoded_row(image_id: int, num_people: int, *, size: int = 32, hw=(40, 64)) -> dict:
    rng = np.random.default_rng(image_id)
    return {
        "image_id": image_id,
        "image": rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8),
        "affines": np.tile(np.array([[0.5, 0, 0], [0, 0.5, 0]], np.float32), (num_people, 1, 1)),
        "skeleton": rng.integers(-127, 128, size=(num_people, 55, size, size), dtype=np.int8),
        "targets": rng.random((num_people, size, size)) > 0.5,
        "person_ids": np.arange(num_people, dtype=np.int64) + 100 * image_id,
        "keypoints": rng.random((num_people, NUM_KEYPOINTS, 3)).astype(np.float32),
    }


def test_collate_pads_normalises_and_flattens_people():
    rows = [decoded_row(1, 2), decoded_row(2, 0), decoded_row(3, 1)]
    batch = collate(rows, input_size=INPUT)
    assert batch.images.shape == (3, 3, INPUT, INPUT)
    assert batch.num_people == 3 and batch.num_images == 3
    assert batch.batch_index.tolist() == [0, 0, 2]
    assert batch.person_ids.tolist() == [100, 101, 300]
    assert batch.image_ids.tolist() == [1, 2, 3]
    assert batch.skeleton.dtype == torch.float32
    assert torch.allclose(
        batch.skeleton[0], torch.from_numpy(rows[0]["skeleton"][0] / 127.0).float()
    )
    assert batch.targets is not None and batch.targets.shape == (3, 32, 32)
    # Padding (below row 40) is black, i.e. -mean/std after normalisation.
    assert torch.allclose(batch.images[0, 0, 50, 0], torch.tensor(-0.485 / 0.229))
    expected = (rows[0]["image"][0, 0, 0] / 255.0 - 0.485) / 0.229
    assert float(batch.images[0, 0, 0, 0]) == pytest.approx(expected, rel=1e-5)
    moved = batch.to("cpu")
    assert moved.num_people == 3
    logits = Pose2Seg(config=SMALL)(batch.images, batch.batch_index, batch.affines, batch.skeleton)
    assert logits.shape == (3, 32, 32)


def test_collate_errors_and_empty_batches():
    with pytest.raises(ValueError, match="exceeds data.input_size"):
        collate([decoded_row(1, 1, hw=(80, 64))], input_size=INPUT)
    rows = [decoded_row(1, 1), decoded_row(2, 1)]
    rows[1]["targets"] = None
    with pytest.raises(ValueError, match=r"images \[2\] have no targets"):
        collate(rows, input_size=INPUT)
    empty = decoded_row(5, 0)
    empty["skeleton"] = np.zeros(0, np.int8)
    batch = collate([empty], input_size=INPUT, roi_size=32)
    assert batch.num_people == 0 and batch.skeleton.shape == (0, 55, 32, 32)
    # Without roi_size a batch of people-less images still trains: empties of S = 0.
    batch = collate([empty, empty], input_size=INPUT)
    assert batch.num_people == 0 and batch.targets is not None
    model = Pose2Seg(config=SMALL)
    logits = model(batch.images, batch.batch_index, batch.affines, batch.skeleton)
    assert logits.shape == (0, 32, 32)
    assert float(mask_loss(logits, batch.targets).detach()) == 0.0


def _place_in_torch_hub(monkeypatch, tmp_path, depth: int) -> torchvision.models.ResNet:
    """A random ResNet saved where torchvision's weights API looks, under the URL's file name."""
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    with torch.no_grad():
        reference.conv1.weight.normal_()
        reference.layer4[-1].bn2.running_var.uniform_(0.5, 2.0)
    weights = getattr(torchvision.models, f"ResNet{depth}_Weights").IMAGENET1K_V1
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(reference.state_dict(), checkpoints / weights.url.rsplit("/", 1)[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return reference


def test_imagenet_backbone_comes_from_the_torch_hub_cache(monkeypatch, tmp_path):
    # No download: the file is already in $TORCH_HOME/hub/checkpoints under torchvision's name.
    reference = _place_in_torch_hub(monkeypatch, tmp_path, 18)
    model = Pose2Seg(config=dataclasses.replace(SMALL, pretrained_backbone="imagenet"))
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(
        model.backbone.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var
    )
    # The FPN is not part of the file and keeps its own init.
    assert model.backbone.lateral[0].weight.shape[0] == SMALL.fpn_channels


def test_imagenet_backbone_with_frozen_batchnorm(monkeypatch, tmp_path):
    reference = _place_in_torch_hub(monkeypatch, tmp_path, 18)
    config = dataclasses.replace(SMALL, pretrained_backbone="imagenet", freeze_backbone_bn=True)
    model = Pose2Seg(config=config)
    bn = model.backbone.layer4[1].bn2
    assert isinstance(bn, torchvision.ops.FrozenBatchNorm2d)
    assert torch.equal(bn.running_var, reference.layer4[1].bn2.running_var)
    # Training mode does not move frozen statistics, and they hold no parameters.
    model.train()
    model.backbone(torch.randn(2, 3, 32, 32))
    assert torch.equal(bn.running_var, reference.layer4[1].bn2.running_var)
    assert not any(name.startswith("layer4.1.bn2") for name, _ in model.backbone.named_parameters())
    # The FPN's own BatchNorm stays trainable.
    assert isinstance(model.backbone.smooth[1], torch.nn.BatchNorm2d)


def test_imagenet_backbone_missing_from_an_offline_cache_names_the_key(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    # Any attempt to reach the network fails at once (the test must never download).
    import torch.hub

    def no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ValueError, match="model.pretrained_backbone.*hub/checkpoints"):
        Pose2Seg(config=dataclasses.replace(SMALL, pretrained_backbone="imagenet"))


def test_pretrained_backbone_none_means_from_scratch():
    config = dataclasses.replace(SMALL, pretrained_backbone="none")
    assert config.pretrained_source == ""
    Pose2Seg(config=config)  # does not try to read a file called "none"
