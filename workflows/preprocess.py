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

from pose2seg.config import Config, ConfigError, load_config  # noqa: E402


def run_preprocess(
    config: Config, *, force: bool = False, splits: tuple[str, ...] = ("train", "val")
):
    """Preprocess ``splits`` of ``config`` on the current Ray instance; returns the summary
    (``preprocessing.pipeline.PreprocessSummary``)."""
    from preprocessing.pipeline import preprocess_dataset

    return preprocess_dataset(config, splits=splits, force=force)


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()  # inside `ray job submit`: passing resources to an existing cluster is an error
    else:
        ray.init(include_dashboard=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (defaults apply to absent keys)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted config key, e.g. --set data.input_size=384 (repeatable)",
    )
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
    parser.add_argument(
        "--address", help="Ray address, e.g. 'auto' (default: a local Ray instance)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    _init_ray(args.address)
    from preprocessing.pipeline import PreprocessError

    splits = tuple(dict.fromkeys(args.splits)) if args.splits else ("train", "val")
    try:
        summary = run_preprocess(config, force=args.force, splits=splits)
    except (PreprocessError, FileNotFoundError, ValueError) as exc:
        print(f"preprocessing failed: {exc}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
