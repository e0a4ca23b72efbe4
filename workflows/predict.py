"""Predict person masks for images and their poses: COCO results JSON and overlay PNGs.

    python workflows/predict.py --model models:/pose2seg@champion \\
        --images path/or/s3://bucket/images --keypoints keypoints.json --out outputs/predict

``--keypoints`` is either a COCO annotation file (``images`` + ``annotations`` with keypoints;
file names come from ``images``) or a COCO keypoint-results list (``image_id``, ``keypoints``);
for a results list, each image is found in ``--images`` as the file whose stem is its id
(``000000000785.jpg`` or ``785.png``). Without ``--keypoints`` every image of ``--images`` is
segmented, its people found by the keypoint detector (Keypoint R-CNN, ``detector.*`` keys).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from pose2seg.config import Config  # noqa: E402
from workflows.cli import (  # noqa: E402
    add_config_args,
    command,
    config_from_args,
    resolve_model_and_connect,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _items_from_keypoints(doc: Any, images_uri: str, *, source: str, unlabelled: bool = False):
    from preprocessing.storage import list_files
    from workflows.batch_inference import InferenceItem, safe_image_uri
    from workflows.eval_io import gt_keypoints, results_keypoints

    if isinstance(doc, dict) and "images" in doc and "annotations" in doc:
        kps = gt_keypoints(doc, include_unlabelled=unlabelled)
        items = []
        for im in doc["images"]:
            # A file_name leaving the images folder is an unsafe_path reject, never opened.
            uri, unsafe = safe_image_uri(images_uri, str(im["file_name"]))
            items.append(
                InferenceItem(int(im["id"]), uri, kps[int(im["id"])], reject_detail=unsafe)
            )
        return items, doc["images"]
    if not isinstance(doc, list):
        raise ValueError(f"{source}: expected a COCO annotation file or a keypoint-results list")
    files = {}
    for path in list_files(images_uri):
        stem, ext = os.path.splitext(os.path.basename(path))
        if ext.lower() in IMAGE_SUFFIXES and stem.isdigit():
            files[int(stem)] = path
    ids = sorted({r.get("image_id") for r in doc if isinstance(r, dict)}, key=str)
    missing = [i for i in ids if i not in files]
    if missing:
        raise FileNotFoundError(
            f"{source}: no image file in {images_uri} for image_id(s) {missing[:10]}"
        )
    pseudo_gt = {"images": [{"id": i} for i in ids]}
    kps = results_keypoints(doc, pseudo_gt, source=source)
    images = [{"id": i, "file_name": os.path.basename(files[i])} for i in ids]
    return [InferenceItem(image_id=i, uri=files[i], keypoints=kps[i]) for i in ids], images


def _items_from_detector(config: Config, images_uri: str, *, num_actors: int, use_gpu: bool):
    """Every image of the folder, its people found by the keypoint detector. Image ids: the
    numeric file stems when every stem is a number, else 1, 2, ... in file-name order."""
    from preprocessing.storage import list_files
    from workflows.batch_inference import InferenceItem
    from workflows.keypoint_detection import run_keypoint_detection

    paths = sorted(
        p for p in list_files(images_uri) if os.path.splitext(p)[1].lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise FileNotFoundError(f"{images_uri}: no {'/'.join(IMAGE_SUFFIXES)} image found")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    numeric = all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems)
    ids = [int(s) for s in stems] if numeric else list(range(1, len(paths) + 1))
    kps = run_keypoint_detection(
        list(zip(ids, paths, strict=True)), config=config, num_actors=num_actors, use_gpu=use_gpu
    )
    items = [
        InferenceItem(image_id=i, uri=p, keypoints=kps[i]) for i, p in zip(ids, paths, strict=True)
    ]
    images = [{"id": i, "file_name": os.path.basename(p)} for i, p in zip(ids, paths, strict=True)]
    return items, images


def run_predict(
    config: Config,
    *,
    model_ref: str,
    images_uri: str,
    keypoints_uri: str | None,
    out_dir: str,
    num_actors: int = 1,
    use_gpu: bool = False,
) -> dict[str, Any]:
    """Predict, write ``results.json`` and overlays; returns a summary dict. Without
    ``keypoints_uri`` the keypoint detector finds the people of every image in ``images_uri``
    (their keypoints are written to ``keypoints.json``, the image ids to ``images.json``)."""
    from preprocessing.storage import read_bytes
    from workflows.batch_inference import run_batch_inference, write_rejects
    from workflows.eval_io import write_overlays

    if keypoints_uri is None:
        items, images = _items_from_detector(
            config, images_uri, num_actors=num_actors, use_gpu=use_gpu
        )
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "keypoints.json"), "w") as fh:
            json.dump(
                [
                    {"image_id": it.image_id, "category_id": 1, "keypoints": k.reshape(-1).tolist()}
                    for it in items
                    for k in it.keypoints
                ],
                fh,
            )
        with open(os.path.join(out_dir, "images.json"), "w") as fh:
            json.dump(images, fh)
    else:
        try:
            doc = json.loads(read_bytes(keypoints_uri))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{keypoints_uri}: not valid JSON: {exc}") from None
        unlabelled = config.model.unlabelled_people == "whole_image"
        items, images = _items_from_keypoints(
            doc, images_uri, source=keypoints_uri, unlabelled=unlabelled
        )
    results, stats = run_batch_inference(
        items, model_ref=model_ref, config=config, num_actors=num_actors, use_gpu=use_gpu
    )
    rejects = stats.pop("rejects")
    os.makedirs(out_dir, exist_ok=True)
    rejects_path = write_rejects(
        rejects, out_dir, num_images=len(items), max_fraction=config.eval.max_reject_fraction
    )
    rejected = {r["image_id"] for r in rejects if r["person_index"] is None}
    images = [im for im in images if int(im["id"]) not in rejected]
    results_path = os.path.join(out_dir, "results.json")
    with open(results_path, "w") as fh:
        json.dump(results, fh)
    kps = {it.image_id: it.keypoints for it in items}
    overlays = write_overlays(
        {"images": images}, results, kps, images_uri, out_dir, limit=config.eval.num_overlays
    )
    return {
        "results_path": results_path,
        "rejects_path": rejects_path,
        "overlays": overlays,
        "num_results": len(results),
        **stats,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument(
        "--model",
        default=None,
        help="models:/NAME@ALIAS (default: the config's), runs:/..., or a checkpoint folder",
    )
    parser.add_argument("--images", required=True, help="folder of images, local or s3://")
    parser.add_argument(
        "--keypoints",
        default=None,
        help="COCO annotation file or keypoint-results JSON, local or s3:// (default: none, "
        "the keypoint detector finds the people of every image; detector.* keys)",
    )
    parser.add_argument(
        "--out", default="outputs/predict", help="output folder for results.json and overlays/"
    )
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--gpu", action="store_true")
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    model_ref = resolve_model_and_connect(args.model, config, args.address)
    summary = run_predict(
        config,
        model_ref=model_ref,
        images_uri=args.images,
        keypoints_uri=args.keypoints,
        out_dir=args.out,
        num_actors=args.actors,
        use_gpu=args.gpu,
    )
    print(
        f"{summary['num_results']} people segmented in {summary['images']} images "
        f"({summary['images_per_s']:.1f} images/s, {summary['people_per_s']:.1f} people/s)"
    )
    if summary["rejected_images"] or summary["rejected_people"]:
        print(
            f"rejected: {summary['rejected_images']} images, {summary['rejected_people']} people "
            f"(see {summary['rejects_path']})"
        )
    print(
        f"results: {summary['results_path']}   overlays: {len(summary['overlays'])} in {os.path.join(args.out, 'overlays')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
