"""Import the official Pose2Seg weights as a registered MLflow model of our paper-mode network.

    python workflows/import_weights.py --checkpoint /path/pose2seg_release.pkl
    python workflows/import_weights.py --checkpoint s3://bucket/pose2seg_release.pkl \\
        --set registry.tracking_uri=http://mlflow:5000 --out s3://bucket/pose2seg/official

``--checkpoint`` is the official release (``pose2seg_release.pkl``, a ``torch.save``'d state
dict of the official model; read with ``weights_only=True``, so no code in it runs), a local
path or ``s3://``. Its tensors are mapped onto our network built with ``--config`` (default
``configs/paper.yaml``: ``model.backbone_style``, ``model.seg_style`` and the other
:data:`pose2seg.official_weights.OFFICIAL_MODEL_KEYS` must have the official values) by
:mod:`pose2seg.official_weights`, saved as a checkpoint folder with the official pose templates
(``--templates``, default ``configs/official_templates.json``), logged to MLflow as a model (the
pyfunc and the bare network, like a trained run's) in the config's tracking store and
experiment, and registered as a new version of ``--name`` (default ``pose2seg-paper``) with
``--alias`` (default ``official``) pointing at it. ``--out`` also writes the checkpoint folder
(local or ``s3://``), usable as ``train.init_weights``; with ``--no-mlflow`` that is all it does.

Exit codes as every command (:mod:`workflows.cli`): a missing, unreadable, truncated or
mismatched checkpoint, or a config that is not the official network, exits 2 with one line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from pose2seg.config import load_config  # noqa: E402
from workflows.cli import UserError, add_debug_arg, command  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "paper.yaml")
DEFAULT_TEMPLATES = os.path.join(REPO_ROOT, "configs", "official_templates.json")
DEFAULT_NAME = "pose2seg-paper"
DEFAULT_ALIAS = "official"


def read_templates(data: bytes, *, source: str, model) -> np.ndarray:
    """Pose templates ``(T, K, 2)`` float32 (NaN = absent joint) from a templates JSON, read as
    preprocessing reads ``model.templates_file``: either layout of
    :func:`pose2seg.templates.templates_from_json` (``configs/official_templates.json``, mirrors
    included in the official search order, or the official repository's file), scaled by
    ``model.template_scale``, mirrors added when ``model.mirror_templates`` and the file has
    none."""
    from pose2seg.templates import mirror_templates, templates_from_json, templates_include_mirrors

    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--templates {source}: not JSON ({exc})") from None
    templates = templates_from_json(doc, source=f"--templates {source}", scale=model.template_scale)
    if model.mirror_templates and not templates_include_mirrors(doc):
        templates = mirror_templates(templates)
    return templates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="the official weights file: a path or s3:// URI"
    )
    parser.add_argument(
        "--templates",
        default=DEFAULT_TEMPLATES,
        help="official pose templates JSON (default: configs/official_templates.json)",
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="the paper-mode config the model is logged with (default: configs/paper.yaml)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one dotted config key, e.g. --set registry.tracking_uri=sqlite:///m.db",
    )
    parser.add_argument("--name", default=DEFAULT_NAME, help="registered model name")
    parser.add_argument("--alias", default=DEFAULT_ALIAS, help="alias set on the new version")
    parser.add_argument(
        "--out", default=None, help="also write the checkpoint folder here (a path or s3://)"
    )
    parser.add_argument(
        "--no-mlflow",
        action="store_true",
        help="only write the --out checkpoint folder: no MLflow run, no registration",
    )
    add_debug_arg(parser)
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    from pose2seg.arch import build_model
    from pose2seg.checkpoint import save_checkpoint
    from pose2seg.official_weights import (
        check_official_model_config,
        load_official_weights,
        read_official_checkpoint,
    )
    from preprocessing.storage import read_bytes, upload_dir
    from workflows import mlflow_tracking as tracking

    args = build_parser().parse_args(argv)
    if args.no_mlflow and not args.out:
        raise UserError("--no-mlflow needs --out (else the imported weights go nowhere)")
    # The official weights fill every tensor: never fetch ImageNet weights for the backbone.
    config = load_config(args.config, [*args.overrides, "model.pretrained_backbone=none"])
    check_official_model_config(config.model)
    templates = read_templates(
        read_bytes(args.templates), source=args.templates, model=config.model
    )
    data = read_bytes(args.checkpoint)
    digest = hashlib.sha256(data).hexdigest()
    state = read_official_checkpoint(data, source=args.checkpoint)
    model = build_model(config.model)
    load_official_weights(model, state, source=args.checkpoint)
    print(f"[pose2seg] {args.checkpoint}: {len(state)} tensors mapped (sha256 {digest[:16]})")

    with tempfile.TemporaryDirectory(prefix="pose2seg-import-") as tmp:
        ckpt_dir = save_checkpoint(
            os.path.join(tmp, "checkpoint"),
            model=model,
            config=config,
            templates=templates,
            state={"imported_from": args.checkpoint, "sha256": digest, "epoch": 0, "step": 0},
        )
        if args.out:
            if "://" in args.out:
                upload_dir(ckpt_dir, args.out)
            else:
                import shutil

                shutil.copytree(ckpt_dir, args.out, dirs_exist_ok=True)
            print(f"[pose2seg] checkpoint folder written to {args.out}")
        if args.no_mlflow:
            return 0
        handle = tracking.start_run(
            config,
            run_name=f"import-{args.name}-{digest[:8]}",
            tags={"pose2seg.kind": "import", "pose2seg.weights_sha256": digest},
        )
        try:
            model_uri = tracking.log_pose2seg_model(handle, ckpt_dir)
            version = tracking.register_with_alias(
                handle,
                model_uri,
                name=args.name,
                alias=args.alias,
                tags={"source": args.checkpoint, "weights_sha256": digest},
            )
        except BaseException:
            tracking.end_run(handle, status="FAILED")
            raise
        tracking.end_run(handle)
    print(
        f"[pose2seg] registered models:/{args.name}@{args.alias} (version {version}) in "
        f"{tracking.redact_uri(handle.tracking_uri)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
