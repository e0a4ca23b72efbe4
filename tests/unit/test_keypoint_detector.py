"""The keypoint-detector stage: Keypoint R-CNN with random weights or a state dict placed where
torchvision's weights API looks (never downloaded), output shapes, the empty case, and the
detected people through the Predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pose2seg.keypoint_detector import Detections, KeypointDetector, build_keypoint_rcnn

SMALL = {"min_size": 96, "max_size": 128}
KPRCNN_FILE = (
    "keypointrcnn_resnet50_fpn_coco-fc266e95.pth"  # KeypointRCNN_ResNet50_FPN_Weights.DEFAULT
)


def _image(h=90, w=120, seed=0) -> np.ndarray:
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def random_rcnn():
    torch.manual_seed(0)
    # Random weights score people around 0.05: a zero threshold keeps max_people of them.
    return build_keypoint_rcnn(max_people=4, person_score_threshold=0.0, **SMALL)


def test_detections_are_coco_keypoints_in_image_pixels(random_rcnn):
    found = KeypointDetector(random_rcnn).detect(_image())
    assert isinstance(found, Detections) and len(found) == 4
    assert found.keypoints.shape == (4, 17, 3) and found.keypoints.dtype == np.float32
    assert found.scores.shape == (4,) and found.boxes.shape == (4, 4)
    assert set(np.unique(found.keypoints[..., 2])) <= {0.0, 2.0}
    xy = found.keypoints[..., :2]
    assert (xy >= 0).all() and (xy[..., 0] <= 120).all() and (xy[..., 1] <= 90).all()
    assert (found.boxes[:, 2:] >= 0).all() and (
        found.boxes[:, 0] + found.boxes[:, 2] <= 120.01
    ).all()
    assert (np.diff(found.scores) <= 0).all()  # best first


def test_keypoint_threshold_sets_visibility(random_rcnn):
    image = _image()
    everything = KeypointDetector(random_rcnn, keypoint_score_threshold=-1e9).detect(image)
    nothing = KeypointDetector(random_rcnn, keypoint_score_threshold=1e9).detect(image)
    assert (everything.keypoints[..., 2] == 2).all()
    assert (nothing.keypoints[..., 2] == 0).all()
    np.testing.assert_array_equal(everything.keypoints[..., :2], nothing.keypoints[..., :2])


def test_no_person_gives_empty_arrays():
    torch.manual_seed(0)
    model = build_keypoint_rcnn(person_score_threshold=0.999, **SMALL)
    found = KeypointDetector(model).detect(_image())
    assert len(found) == 0
    assert found.keypoints.shape == (0, 17, 3) and found.boxes.shape == (0, 4)
    assert found.scores.shape == (0,)


def test_batch_of_images_of_different_sizes(random_rcnn):
    detector = KeypointDetector(random_rcnn)
    found = detector.detect_batch([_image(90, 120), _image(64, 48, seed=1)])
    assert len(found) == 2
    assert (found[1].keypoints[..., 0] <= 48).all() and (found[1].keypoints[..., 1] <= 64).all()
    assert detector.detect_batch([]) == []
    with pytest.raises(ValueError, match=r"image 0.*uint8"):
        detector.detect(np.zeros((10, 10), np.uint8))


def test_weights_api_reads_the_torch_hub_cache_without_downloading(tmp_path, monkeypatch):
    import torch.hub

    torch.manual_seed(1)
    written = build_keypoint_rcnn(**SMALL).state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(written, cache / KPRCNN_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("the weights API tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    loaded = build_keypoint_rcnn(pretrained=True, **SMALL).state_dict()
    key = "roi_heads.keypoint_predictor.kps_score_lowres.weight"
    torch.testing.assert_close(loaded[key], written[key])
    with pytest.raises(ValueError, match="either"):
        build_keypoint_rcnn(pretrained=True, state_dict=written)


def test_workflow_loader_reads_a_local_state_dict_and_names_bad_files(tmp_path):
    from pose2seg.config import Config
    from workflows.keypoint_detection import load_keypoint_detector

    torch.manual_seed(2)
    written = build_keypoint_rcnn(**SMALL).state_dict()
    path = tmp_path / "kprcnn.pth"
    torch.save(written, path)
    config = Config().with_overrides(
        {"detector.weights": str(path), "detector.min_size": 96, "detector.max_size": 128}
    )
    detector = load_keypoint_detector(config)
    key = "roi_heads.box_predictor.cls_score.weight"
    torch.testing.assert_close(detector.model.state_dict()[key], written[key])
    assert detector.model.transform.min_size == (96,)

    with pytest.raises(FileNotFoundError, match="detector.weights"):
        load_keypoint_detector(
            config.with_overrides({"detector.weights": str(tmp_path / "no.pth")})
        )
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="not a torch state dict"):
        load_keypoint_detector(config.with_overrides({"detector.weights": str(junk)}))
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="not Keypoint R-CNN"):
        load_keypoint_detector(config.with_overrides({"detector.weights": str(other)}))


def test_detected_people_go_through_the_predictors_usual_path(random_rcnn):
    """People with 1-2 usable keypoints are aligned by the fallback; none: no mask."""
    from pose2seg.arch import build_model
    from pose2seg.config import ModelConfig
    from pose2seg.inference import Predictor

    image = _image()
    found = KeypointDetector(random_rcnn, keypoint_score_threshold=-1e9).detect(image)
    kpts = found.keypoints.copy()
    kpts[1, 2:, 2] = 0  # two usable keypoints: the fallback alignment
    kpts[2, :, 2] = 0  # none: cannot be aligned
    cfg = ModelConfig(
        backbone_depth=18, fpn_channels=16, roi_size=16, num_residual_units=1, seg_channels=8
    )
    torch.manual_seed(0)
    templates = np.random.RandomState(0).rand(2, 17, 2).astype(np.float32)
    predictor = Predictor(build_model(cfg), templates, cfg, input_size=96)
    results = predictor.predict(image, kpts, image_id=3)
    assert len(results) == 3  # people 0, 1 and 3
    assert all(r["segmentation"]["size"] == [90, 120] for r in results)
