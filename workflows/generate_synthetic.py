"""Generate the synthetic occluded-people dataset (and optionally a preview PNG).

    python workflows/generate_synthetic.py --out data/synthetic --preview docs/synthetic_samples.png
    python workflows/generate_synthetic.py --config configs/x.yaml --set data.synthetic_num_train=64

Reads the ``data.synthetic_*`` keys of the config (``--config`` / ``--set``); ``--out`` overrides
``data.root``. An identical dataset already at the root (same ``synthetic_meta.json``) is kept
unless ``--force``. Prints the generation summary as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from pose2seg.config import Config, load_config
from preprocessing import storage
from preprocessing.coco import CocoPersonDataset
from preprocessing.synthetic import (
    SEGMENTATION_FORMATS,
    generate_synthetic_dataset,
    read_synthetic_meta,
    synthetic_params,
)
from preprocessing.visualize import draw_instances, image_grid
from workflows.cli import add_debug_arg, command


def generate(
    config: Config, *, segmentation: str = "polygon", force: bool = False
) -> dict[str, Any]:
    """Generate the dataset at ``config.data.root`` unless an identical one is there.

    Returns the generator's summary, or ``{"root", "params", "skipped": True}`` when kept.
    """
    root = config.data.root
    params = synthetic_params(config)
    params["segmentation"] = segmentation
    meta = read_synthetic_meta(root)
    if not force and meta is not None and meta.get("params") == params:
        return {"root": root, "params": params, "skipped": True}
    kwargs = {k: v for k, v in params.items() if k != "generator_version"}
    return generate_synthetic_dataset(root, **kwargs)


def write_preview(
    root: str, path: str, *, split: str = "val", count: int = 4, columns: int = 4
) -> str:
    """Write a PNG grid of ``count`` images of ``split``: each raw image beside its overlay.

    Overlays show every person's visible mask in its own colour and its keypoints/skeleton
    (filled dots visible, hollow dots hidden). The PNG is palette-quantised to stay small.
    """
    dataset = CocoPersonDataset(
        storage.join(root, f"annotations/person_keypoints_{split}.json"),
        storage.join(root, f"images/{split}"),
        split=split,
    )
    tiles: list[np.ndarray] = []
    for record, rejections in dataset.iter_records(dataset.image_ids[:count]):
        if record is None:
            raise RuntimeError(f"preview: {rejections[0].reason}: {rejections[0].detail}")
        masks = np.stack([p.mask for p in record.people]) if record.people else []
        keypoints = np.stack([p.keypoints for p in record.people]) if record.people else None
        tiles += [record.pixels, draw_instances(record.pixels, masks, keypoints)]
    grid = Image.fromarray(image_grid(tiles, columns=columns))
    buf = io.BytesIO()
    grid.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
        buf, format="PNG", optimize=True
    )
    storage.write_bytes(path, buf.getvalue())
    return path


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", help="dataset root (local path or s3://); default: data.root of the config"
    )
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument("--segmentation", choices=SEGMENTATION_FORMATS, default="polygon")
    parser.add_argument(
        "--force", action="store_true", help="regenerate even if an identical dataset exists"
    )
    parser.add_argument(
        "--preview", metavar="PNG", help="also write a preview grid of val images here"
    )
    parser.add_argument("--preview-count", type=int, default=4, help="images in the preview")
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    overrides = list(args.set)
    if args.out:
        overrides.append(f"data.root={args.out}")
    config = load_config(args.config, overrides)
    summary = generate(config, segmentation=args.segmentation, force=args.force)
    if args.preview:
        summary["preview"] = write_preview(config.data.root, args.preview, count=args.preview_count)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
