"""Paper mode's network is the official Pose2Seg's, number for number (issue 24, network half).

Against the official code's own outputs (``../shared/data/official_reference/``, its README):
the official state dict built by the fixture's weight rule, mapped onto our paper-mode model by
:mod:`pose2seg.official_weights`, must give the official backbone output ``p1`` of image
197388, the official SegModule logits of its 5 people from the same RoI inputs, and both our
official-rule skeleton renderers the official skeleton features of all 14 people. Tolerances
are the fixture README's: float16 storage plus float32 noise, ``|a - b| <= 1e-3 + 1e-3 |b|``
for the networks, 2.5e-4 (float16 rounding of values in [-1, 1]) for the skeleton.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pose2seg.config import ModelConfig, load_config
from pose2seg.model import Pose2Seg
from pose2seg.official_weights import (
    OFFICIAL_MODEL_KEYS,
    OfficialWeightsError,
    load_official_weights,
    map_official_state_dict,
)
from pose2seg.ops import render_skeleton_features as render_torch
from pose2seg.skeleton import official_skeleton_channel_map
from preprocessing.features import render_quantised_skeleton_features
from preprocessing.features import render_skeleton_features as render_numpy
from tests.official_weights_fixture import (
    OFFICIAL_REFERENCE,
    official_state_dict,
    requires_official_reference,
)

pytestmark = requires_official_reference

IMAGE_ID = 197388
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


ROOT = Path(__file__).resolve().parents[2]


def paper_config():
    """configs/paper.yaml without the ImageNet download (the official network and geometry)."""
    return load_config(
        str(ROOT / "configs" / "paper.yaml"),
        [
            "model.pretrained_backbone=none",
            f"model.templates_file={ROOT / 'configs' / 'official_templates.json'}",
        ],
    )


def paper_model_config(**overrides) -> ModelConfig:
    model = dataclasses.replace(paper_config().model, **overrides)
    assert all(getattr(model, k) == v for k, v in OFFICIAL_MODEL_KEYS.items() if k not in overrides)
    return model


def within(ours: np.ndarray, ref: np.ndarray, *, atol: float, rtol: float) -> float:
    """The largest excess over the tolerance (<= 0: within)."""
    ref = ref.astype(np.float64)
    return float((np.abs(ours.astype(np.float64) - ref) - (atol + rtol * np.abs(ref))).max())


def official_to_ours_channels(official: np.ndarray) -> np.ndarray:
    """(N, 55, S, S) official skeleton channel order -> ours."""
    index, sign = official_skeleton_channel_map()
    ours = np.zeros_like(official, dtype=np.float32)
    for c, (i, s) in enumerate(zip(index, sign, strict=True)):
        ours[:, i] = s * official[:, c].astype(np.float32)
    return ours


@pytest.fixture(scope="module")
def fixture():
    people = dict(np.load(OFFICIAL_REFERENCE / "people.npz"))
    images = dict(np.load(OFFICIAL_REFERENCE / "images.npz"))
    backbone = dict(np.load(OFFICIAL_REFERENCE / "backbone_p1_197388.npz"))
    return people, images, backbone


@pytest.fixture(scope="module")
def official_model():
    torch.manual_seed(0)
    model = Pose2Seg(config=paper_model_config()).eval()
    load_official_weights(model, official_state_dict(), source="the rule-built state dict")
    return model


@pytest.fixture(scope="module")
def our_p1(fixture, official_model):
    """Our backbone output on image 197388's official network input, (1, 256, 128, 128)."""
    _, images, _ = fixture
    row = int(np.flatnonzero(images["image_id"] == IMAGE_ID)[0])
    rgb = torch.from_numpy(images["net_input_rgb"][row].astype(np.float32))  # (512, 512, 3)
    x = (rgb.permute(2, 0, 1) / 255.0 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[
        :, None, None
    ]
    with torch.no_grad():
        return official_model.backbone(x[None].float())


def test_backbone_gives_the_official_p1(fixture, our_p1):
    _, _, backbone = fixture
    ours = our_p1.numpy()
    assert ours.shape == backbone["p1"].shape == (1, 256, 128, 128)
    assert within(ours, backbone["p1"], atol=1e-3, rtol=1e-3) <= 0
    # The float32 samples are exact: float32 CPU noise only.
    c, r, col = backbone["sample_positions"].T
    sampled = ours[0, c, r, col]
    assert within(sampled, backbone["sample_values"], atol=1e-4, rtol=1e-4) <= 0


def sample_rois(p1: torch.Tensor, feat_to_roi: np.ndarray, roi_size: int = 64) -> torch.Tensor:
    """RoI features as the official code samples them (fixture README, "RoI sampling"):
    pixel (j, i) of the RoI = bilinear sample, zero outside, of ``p1`` at feature index
    ``inverse(feat_to_roi) (j, i, 1)`` (pixel centres on integers), float64."""
    n = len(feat_to_roi)
    h, w = p1.shape[-2:]
    full = np.concatenate([feat_to_roi, np.tile([[[0.0, 0.0, 1.0]]], (n, 1, 1))], axis=1)
    inv = np.linalg.inv(full)[:, :2]  # (N, 2, 3) RoI index -> feature index
    jj, ii = np.meshgrid(np.arange(roi_size), np.arange(roi_size))
    pts = np.stack([jj, ii, np.ones_like(jj)], axis=-1).astype(np.float64)  # (S, S, 3)
    src = np.einsum("nab,yxb->nyxa", inv, pts)  # (N, S, S, 2) x, y feature index
    grid = np.empty_like(src)
    grid[..., 0] = 2.0 * src[..., 0] / (w - 1) - 1.0
    grid[..., 1] = 2.0 * src[..., 1] / (h - 1) - 1.0
    feats = p1.to(torch.float64).expand(n, -1, -1, -1)
    out = F.grid_sample(
        feats, torch.from_numpy(grid), mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return out.to(torch.float32)


def test_segmodule_gives_the_official_logits(fixture, official_model, our_p1):
    people, _, _ = fixture
    rows = np.flatnonzero(people["image_id"] == IMAGE_ID)
    assert len(rows) == 5
    rois = sample_rois(our_p1, people["feat_to_roi_sampling"][rows])
    skeleton = torch.from_numpy(official_to_ours_channels(people["skeleton"][rows]))
    with torch.no_grad():
        logits = official_model.seg.head_logits(torch.cat([rois, skeleton], dim=1)).numpy()
    ref = people["seg_logits"][rows]
    assert logits.shape == ref.shape == (5, 2, 64, 64)
    assert within(logits, ref, atol=1e-3, rtol=1e-3) <= 0


@pytest.mark.parametrize("index_convention", [True, False])
@pytest.mark.parametrize("renderer", ["numpy", "torch"])
def test_official_skeleton_rendering(fixture, renderer, index_convention):
    """From the RoI keypoints in paper mode's index convention (model.roi_geometry=official),
    or in our +0.5 convention."""
    people, _, _ = fixture
    kpts = people["keypoints_in_roi"].astype(np.float32).copy()  # index convention
    if not index_convention:
        kpts[..., :2] += 0.5  # our aligned frame: pixel centres at +0.5
    args = dict(
        roi_size=64,
        sigma_px=3.0,
        width_px=1.0,
        hidden_negative=True,
        index_convention=index_convention,
    )
    if renderer == "numpy":
        ours = render_numpy(kpts, rendering="official", **args)
    else:
        ours = render_torch(torch.from_numpy(kpts), rendering="official", **args).numpy()
    ref = official_to_ours_channels(people["skeleton"])
    assert ours.shape == ref.shape == (14, 55, 64, 64)
    assert np.abs(ref).sum() > 0
    assert np.abs(ours - ref).max() <= 2.5e-4
    # Our own rule is another one: the test can fail.
    ours_rule = render_numpy(kpts, rendering="ours", **{**args, "index_convention": False})
    assert np.abs(ours_rule - ref).max() > 0.1


def test_stored_official_skeleton_is_the_quantised_rendering(fixture):
    people, _, _ = fixture
    kpts = people["keypoints_in_roi"].astype(np.float32).copy()
    kpts[..., :2] += 0.5
    args = dict(roi_size=64, sigma_px=3.0, width_px=1.0, hidden_negative=True)
    stored = render_quantised_skeleton_features(kpts, rendering="official", **args)
    dense = render_numpy(kpts, rendering="official", **args)
    assert np.array_equal(stored, np.clip(np.rint(dense * 127), -127, 127).astype(np.int8))


def test_channel_map_is_a_signed_permutation():
    index, sign = official_skeleton_channel_map()
    assert sorted(index) == list(range(55))
    assert index[:17] == tuple(range(38, 55))
    assert sum(s < 0 for s in sign) == 8  # x and y of the 4 reversed leg limbs


def test_mapping_accepts_module_prefix_and_names_bad_tensors(official_model):
    official = official_state_dict()
    prefixed = {f"module.{k}": v for k, v in official.items()}
    a = map_official_state_dict(official, official_model)
    b = map_official_state_dict(prefixed, official_model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    broken = dict(official)
    del broken["segnet.pred_small.bias"]
    broken["backbone.extra.weight"] = torch.zeros(1)
    broken["backbone.fpn_c1p1.weight"] = torch.zeros(256, 255, 1, 1)
    with pytest.raises(OfficialWeightsError) as info:
        map_official_state_dict(broken, official_model, source="x.pkl")
    message = str(info.value)
    assert "\n" not in message and message.startswith("x.pkl")
    assert "seg.head.bias" in message
    assert "backbone.extra.weight" in message
    assert "backbone.lateral.0.weight (256, 255, 1, 1) != (256, 256, 1, 1)" in message


def test_official_weights_need_the_official_network():
    model = Pose2Seg(config=paper_model_config(backbone_style="ours", seg_channels=8))
    with pytest.raises(OfficialWeightsError, match="model.backbone_style='ours'"):
        load_official_weights(model, {})


def test_paper_mode_end_to_end_gives_the_official_masks(official_model):
    """The imported official weights through the whole paper-mode Predictor (configs/paper.yaml:
    the official geometry and network) on the 4 sample images with their ground-truth
    keypoints: every one of the 14 people's masks matches the official code's (IoU >= 0.999,
    differing pixels within those the fixture marks as within 1e-3 of the threshold), score 1."""
    import json

    from pycocotools import mask as mask_utils

    from pose2seg.inference import Predictor
    from pose2seg.templates import templates_from_json

    cv2 = pytest.importorskip("cv2")
    sample = OFFICIAL_REFERENCE.parent / "coco_person_sample"
    if not (sample / "person_keypoints_sample.json").is_file():
        pytest.skip(f"the COCO person sample is absent ({sample})")
    config = paper_config()
    ref = json.loads((OFFICIAL_REFERENCE / "reference.json").read_text())
    coco = json.loads((sample / "person_keypoints_sample.json").read_text())
    templates = templates_from_json(
        json.loads((OFFICIAL_REFERENCE / "templates.json").read_text()), scale=1.0
    )
    predictor = Predictor(
        official_model,
        templates,
        config.model,
        input_size=config.data.input_size,
        precision="fp32",
        input_frame=config.data.input_frame,
    )
    people_by_ann = {p["ann_id"]: p for p in ref["people"]}
    checked = 0
    for image in ref["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == image["image_id"]]
        anns = [a for a in anns if not a.get("iscrowd")]
        kpts = np.asarray([a.get("keypoints") or [0] * 51 for a in anns], np.float32)
        bgr = cv2.imread(str(sample / image["file_name"]))
        results = predictor.predict(
            np.ascontiguousarray(bgr[..., ::-1]), kpts.reshape(-1, 17, 3), image_id=0
        )
        assert [r["person_index"] for r in results] == list(range(len(anns)))
        for ann, result in zip(anns, results, strict=True):
            person = people_by_ann[ann["id"]]
            ours = mask_utils.decode(result["segmentation"]).astype(bool)
            official = mask_utils.decode(person["mask"]["segmentation"]).astype(bool)
            iou = (ours & official).sum() / (ours | official).sum()
            assert iou >= 0.999, f"person {ann['id']}: IoU {iou:.5f}"
            assert (ours ^ official).sum() <= person["mask_pixels_prob_within_1e-3_of_0.5"]
            assert result["score"] == 1.0
            checked += 1
    assert checked == 14
