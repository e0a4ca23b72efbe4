"""The synthetic occluded-people generator: COCO validity, painter's order, visibility, occlusion."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pose2seg.config import Config
from pose2seg.skeleton import KEYPOINT_NAMES, LIMBS
from preprocessing import synthetic
from preprocessing.synthetic import (
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
    mask_to_polygons,
    mask_to_rle,
)
from preprocessing.visualize import draw_instances, image_grid
from workflows import generate_synthetic as generate_script

SMALL = {
    "num_train": 10,
    "num_val": 16,
    "image_size": 128,
    "max_people": 4,
    "overlap": 0.6,
    "seed": 7,
}
# A keypoint flagged visible lies on its person's visible mask or within this many pixels of it
# (the flag is computed on the pixel containing the keypoint, so 0 would do; 1 allows rounding).
VISIBLE_TOLERANCE_PX = 1


def _load(root: Path, split: str) -> COCO:
    return COCO(str(root / "annotations" / f"person_keypoints_{split}.json"))


def _masks_by_image(coco: COCO) -> dict[int, list[tuple[dict, np.ndarray]]]:
    out: dict[int, list[tuple[dict, np.ndarray]]] = {}
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        out[image_id] = [(a, coco.annToMask(a).astype(bool)) for a in anns]
    return out


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != synthetic.META_FILE
    }


@pytest.fixture(scope="module")
def polygon_set(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthetic_polygon")
    summary = generate_synthetic_dataset(str(root), segmentation="polygon", **SMALL)
    return root, summary


@pytest.fixture(scope="module")
def rle_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic_rle")
    generate_synthetic_dataset(str(root), segmentation="rle", **SMALL)
    return root


def test_layout_and_summary(polygon_set):
    root, summary = polygon_set
    for split, count in (("train", SMALL["num_train"]), ("val", SMALL["num_val"])):
        files = sorted(os.listdir(root / "images" / split))
        assert len(files) == count
        assert all(f.endswith(".png") and len(f) == 16 for f in files)
        coco = _load(root, split)
        assert len(coco.getImgIds()) == count
        assert summary["splits"][split]["people"] == len(coco.getAnnIds())
        for info in coco.loadImgs(coco.getImgIds()):
            with Image.open(root / "images" / split / info["file_name"]) as img:
                assert img.mode == "RGB"
                assert (img.height, img.width) == (info["height"], info["width"]) == (128, 128)
    assert summary["params"]["seed"] == SMALL["seed"]
    assert json.loads((root / synthetic.META_FILE).read_text())["params"] == summary["params"]
    train_ids = set(_load(root, "train").getImgIds())
    assert not train_ids & set(_load(root, "val").getImgIds())


def test_categories_are_coco_person_keypoints(polygon_set):
    root, _ = polygon_set
    (category,) = json.loads((root / "annotations" / "person_keypoints_train.json").read_text())[
        "categories"
    ]
    assert category["name"] == "person" and category["id"] == 1
    assert category["keypoints"] == list(KEYPOINT_NAMES)
    assert category["skeleton"] == [[a + 1, b + 1] for a, b in LIMBS]


def test_deterministic_from_seed(tmp_path, polygon_set):
    root, _ = polygon_set
    again = tmp_path / "again"
    generate_synthetic_dataset(str(again), segmentation="polygon", **SMALL)
    assert _tree_digest(again) == _tree_digest(root)
    other = tmp_path / "other"
    generate_synthetic_dataset(str(other), segmentation="polygon", **{**SMALL, "seed": 8})
    assert _tree_digest(other) != _tree_digest(root)


def test_image_content_does_not_depend_on_split_size(tmp_path, polygon_set):
    root, _ = polygon_set
    fewer = tmp_path / "fewer"
    generate_synthetic_dataset(str(fewer), segmentation="polygon", **{**SMALL, "num_train": 3})
    for name in sorted(os.listdir(fewer / "images" / "train")):
        assert (fewer / "images" / "train" / name).read_bytes() == (
            root / "images" / "train" / name
        ).read_bytes()


@pytest.mark.parametrize("split", ["train", "val"])
def test_annotations_match_visible_masks(polygon_set, split):
    root, _ = polygon_set
    coco = _load(root, split)
    n_people = 0
    for image_id, people in _masks_by_image(coco).items():
        info = coco.loadImgs(image_id)[0]
        stack = np.zeros((info["height"], info["width"]), dtype=np.int32)
        for ann, mask in people:
            n_people += 1
            stack += mask
            assert ann["iscrowd"] == 0 and ann["category_id"] == 1
            assert ann["area"] == mask.sum() > 0
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            assert ann["bbox"] == [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
            kps = np.asarray(ann["keypoints"], dtype=np.float64).reshape(17, 3)
            assert ann["num_keypoints"] == int((kps[:, 2] > 0).sum()) >= 1
            assert 0.0 <= ann["max_iou"] <= 1.0 and 0.0 <= ann["max_mask_iou"] <= 1.0
        # Painter's order: every pixel belongs to at most one person's visible mask.
        assert stack.max() <= 1, f"visible masks overlap in image {image_id}"
    assert n_people > 0


@pytest.mark.parametrize("split", ["train", "val"])
def test_visibility_flags_agree_with_masks(polygon_set, split):
    root, _ = polygon_set
    coco = _load(root, split)
    counts = {0: 0, 1: 0, 2: 0}
    t = VISIBLE_TOLERANCE_PX
    for image_id, people in _masks_by_image(coco).items():
        size = coco.loadImgs(image_id)[0]["height"]
        union = np.zeros((size, size), dtype=bool)
        for _, mask in people:
            union |= mask
        for ann, mask in people:
            kps = np.asarray(ann["keypoints"], dtype=np.float64).reshape(17, 3)
            for x, y, v in kps:
                counts[int(v)] += 1
                if v == 0:
                    assert x == 0 and y == 0, "unlabelled keypoints are (0, 0, 0) as in COCO"
                    continue
                r, c = int(y), int(x)
                assert 0 <= r < size and 0 <= c < size, "labelled keypoints lie inside the image"
                near = mask[max(0, r - t) : r + t + 1, max(0, c - t) : c + t + 1]
                if v == 2:
                    assert near.any(), (
                        f"visible keypoint ({x}, {y}) of annotation {ann['id']} is off its mask"
                    )
                else:
                    # hidden: someone in front owns that pixel, so it is not this person's
                    assert not mask[r, c], (
                        f"hidden keypoint ({x}, {y}) of {ann['id']} is on its own mask"
                    )
    assert counts[2] > counts[1] > 0  # both flags occur; most keypoints are visible


def test_val_split_is_heavily_occluded(tmp_path):
    summary = generate_synthetic_dataset(
        str(tmp_path), num_train=30, num_val=40, image_size=128, max_people=4, overlap=0.6, seed=0
    )
    ious = np.array([a["max_iou"] for a in _load(tmp_path, "val").dataset["annotations"]])
    assert (ious >= 0.5).mean() >= 0.5, (
        f"only {(ious >= 0.5).mean():.2f} of val people have MaxIoU >= 0.5"
    )
    assert ious.mean() > summary["splits"]["train"]["mean_max_iou"]
    assert summary["splits"]["val"]["fraction_max_iou_ge_0.5"] == pytest.approx(
        (ious >= 0.5).mean()
    )
    # Every val image has at least two people drawn (a dropped one still occludes).
    assert (
        summary["splits"]["val"]["people"] + summary["splits"]["val"]["dropped_occluded"]
        >= 2 * 40 - 4
    )


def test_overlap_controls_occlusion(tmp_path):
    means = []
    for overlap in (0.0, 1.0):
        summary = generate_synthetic_dataset(
            str(tmp_path / str(overlap)),
            num_train=30,
            num_val=1,
            image_size=128,
            max_people=3,
            overlap=overlap,
            seed=1,
        )
        means.append(summary["splits"]["train"]["mean_max_iou"])
    assert means[0] < 0.15 < 0.4 < means[1]


def test_val_overlap_is_its_own_setting(tmp_path):
    assert synthetic.split_overlap("val", 0.6) == pytest.approx(0.88)
    assert synthetic.split_overlap("val", 0.6, 0.1) == 0.1
    assert synthetic.split_overlap("train", 0.6, 0.1) == 0.6
    means = []
    for val_overlap in (0.0, 1.0):
        summary = generate_synthetic_dataset(
            str(tmp_path / str(val_overlap)),
            num_train=1,
            num_val=30,
            image_size=128,
            max_people=3,
            overlap=0.5,
            val_overlap=val_overlap,
            seed=1,
        )
        assert summary["params"]["val_overlap"] == val_overlap
        means.append(summary["splits"]["val"]["mean_max_iou"])
    assert means[0] < 0.4 < means[1]
    with pytest.raises(ValueError, match="val_overlap"):
        generate_synthetic_dataset(str(tmp_path / "bad"), num_train=1, num_val=1, val_overlap=1.5)
    # The config's keys reach the generator (and so the dataset's identity).
    config = Config.from_flat({"data.synthetic_overlap": 0.3, "data.synthetic_val_overlap": 0.9})
    assert synthetic.synthetic_params(config)["val_overlap"] == 0.9
    assert synthetic.synthetic_params(config)["overlap"] == 0.3


def test_polygons_reproduce_rle_masks(polygon_set, rle_set):
    root, _ = polygon_set
    for split in ("train", "val"):
        poly = _load(root, split)
        rle = _load(rle_set, split)
        assert poly.getAnnIds() == rle.getAnnIds()
        for ann_id in poly.getAnnIds():
            p_ann, r_ann = poly.loadAnns(ann_id)[0], rle.loadAnns(ann_id)[0]
            assert isinstance(p_ann["segmentation"], list) and isinstance(
                r_ann["segmentation"], dict
            )
            a, b = poly.annToMask(p_ann).astype(bool), rle.annToMask(r_ann).astype(bool)
            iou = (a & b).sum() / (a | b).sum()
            assert iou > 0.95
            assert np.array_equal(a, b)  # crack-edge polygons are exact


def test_mixed_segmentation_has_both_formats(tmp_path):
    generate_synthetic_dataset(str(tmp_path), segmentation="mixed", **{**SMALL, "num_val": 2})
    kinds = {
        type(a["segmentation"]).__name__ for a in _load(tmp_path, "train").dataset["annotations"]
    }
    assert kinds == {"list", "dict"}


def test_mask_to_polygons_exact_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(3, 30, size=2))
        mask = rng.random((h, w)) < rng.uniform(0.1, 0.9)  # holes, islands, diagonal touches
        if not mask.any():
            continue
        polygons = mask_to_polygons(mask)
        assert all(len(p) >= 8 and len(p) % 2 == 0 for p in polygons)
        decoded = mask_utils.decode(
            mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
        ).astype(bool)
        assert np.array_equal(decoded, mask)


def test_mask_to_polygons_ring_and_empty():
    ring = np.zeros((12, 12), dtype=bool)
    ring[2:10, 2:10] = True
    ring[4:8, 4:8] = False
    (polygon,) = mask_to_polygons(ring)  # the hole is spliced into the outer boundary
    decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], 12, 12))).astype(
        bool
    )
    assert np.array_equal(decoded, ring)
    assert mask_to_polygons(np.zeros((5, 5), dtype=bool)) == []
    rle = mask_to_rle(ring)
    assert rle["size"] == [12, 12] and isinstance(rle["counts"], str)
    assert np.array_equal(
        mask_utils.decode({**rle, "counts": rle["counts"].encode()}).astype(bool), ring
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"segmentation": "png"}, "segmentation"),
        ({"overlap": 1.5}, "overlap"),
        ({"max_people": 0}, "max_people"),
        ({"image_size": 32}, "image_size"),
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_synthetic_dataset(str(tmp_path), **{**SMALL, **kwargs})


def test_ensure_generates_once_and_on_change(tmp_path):
    root = str(tmp_path / "syn")
    config = Config().with_overrides(
        {
            "data.root": root,
            "data.synthetic_num_train": 3,
            "data.synthetic_num_val": 2,
            "data.synthetic_image_size": 96,
        }
    )
    assert ensure_synthetic_dataset(config) == root
    meta = Path(root) / synthetic.META_FILE
    first = meta.stat().st_mtime_ns
    marker = Path(root) / "images" / "train" / "000000000001.png"
    marker.write_bytes(b"touched")  # a regeneration would overwrite this
    ensure_synthetic_dataset(config)
    assert meta.stat().st_mtime_ns == first and marker.read_bytes() == b"touched"
    ensure_synthetic_dataset(config.with_overrides({"data.synthetic_num_train": 4}))
    assert json.loads(meta.read_text())["params"]["num_train"] == 4
    assert marker.read_bytes() != b"touched"
    assert len(os.listdir(Path(root) / "images" / "train")) == 4


def test_script_generates_and_writes_preview(tmp_path, capsys):
    out, preview = tmp_path / "data", tmp_path / "preview.png"
    args = [
        "--out",
        str(out),
        "--set",
        "data.synthetic_num_train=2",
        "--set",
        "data.synthetic_num_val=3",
    ]
    assert (
        generate_script.main(
            [*args, "--set", "data.synthetic_image_size=96", "--preview", str(preview)]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["val"]["images"] == 3
    with Image.open(preview) as img:
        assert img.width > 4 * 96 and img.height >= 96
    assert preview.stat().st_size < 500_000
    # Same parameters again: the dataset is kept.
    assert generate_script.main([*args, "--set", "data.synthetic_image_size=96"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] is True


def test_draw_instances_colours_masks_only():
    pixels = np.full((32, 32, 3), 100, dtype=np.uint8)
    masks = np.zeros((2, 32, 32), dtype=bool)
    masks[0, 2:10, 2:10] = True
    masks[1, 20:30, 20:30] = True
    keypoints = np.zeros((2, 17, 3), dtype=np.float32)
    keypoints[0, 0] = (5, 5, 2)
    out = draw_instances(pixels, masks, keypoints)
    assert out.shape == pixels.shape and out.dtype == np.uint8
    assert (pixels == 100).all(), "the input is not modified"
    assert (out[15, 15] == 100).all(), "background untouched"
    assert not (out[25, 25] == 100).all() and not (out[4, 8] == 100).all()
    assert not np.array_equal(out[25, 25], out[4, 8]), "one colour per instance"
    with pytest.raises(ValueError, match="tile 1"):
        image_grid([pixels, pixels[:10]], columns=2)
