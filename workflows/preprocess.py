"""Entry script: build the preprocessed Parquet variant of a config with Ray Data.

    python workflows/preprocess.py --config configs/default.yaml [--set key=value ...] [--force]
    ray job submit --working-dir . -- python workflows/preprocess.py --config ...

Ray: a local ``ray.init()`` by default; ``--address`` (e.g. ``auto``) joins a cluster; inside
``ray job submit`` (``RAY_ADDRESS`` set) a bare ``ray.init()`` connects to the job's cluster.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pose2seg.config import Config  # noqa: E402
from workflows.cli import add_config_args, command, config_from_args, init_ray  # noqa: E402


def run_preprocess(
    config: Config, *, force: bool = False, splits: tuple[str, ...] = ("train", "val")
):
    """Preprocess ``splits`` of ``config`` on the current Ray instance; returns the summary
    (``preprocessing.pipeline.PreprocessSummary``)."""
    from preprocessing.pipeline import preprocess_dataset

    return preprocess_dataset(config, splits=splits, force=force)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if the variant is complete"
    )
    parser.add_argument(
        "--split",
        dest="splits",
        action="append",
        choices=("train", "val"),
        help="only these splits (repeatable; default: train and val)",
    )
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    init_ray(args.address)
    splits = tuple(dict.fromkeys(args.splits)) if args.splits else ("train", "val")
    # A PreprocessError (too many rejects, an incomplete output), a missing dataset or a bad
    # annotation file is one line on stderr and exit code 2 (workflows.cli.run_main).
    summary = run_preprocess(config, force=args.force, splits=splits)
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
