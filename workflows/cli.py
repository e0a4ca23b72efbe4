"""What every entry script shares: config arguments, Ray start-up, a readable error exit."""

from __future__ import annotations

import argparse
import os
import sys

from pose2seg.config import Config, ConfigError, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="experiment YAML (configs/*.yaml); defaults: configs/default.yaml values"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one dotted config key, e.g. --set train.epochs=3 (repeatable)",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: $RAY_ADDRESS inside `ray job submit`, else a new local instance)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to a cluster (``--address`` / ``$RAY_ADDRESS``) or start a local instance."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside `ray job submit` RAY_ADDRESS is set; resources come from the cluster.
        ray.init(address=address, log_to_driver=True)
    else:
        # The dashboard (ray[default]) also serves the State API that Ray Train's controller
        # polls; without it Train prints "Failed to query Ray Train Controller actor state".
        ray.init(num_cpus=num_cpus, log_to_driver=True)


def run_main(fn, argv: list[str] | None) -> int:
    """Run an entry point; turn configuration and input errors into one clear line and exit 2."""
    try:
        return int(fn(argv) or 0)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


def resolve_model_and_connect(model_arg: str | None, config: Config, address: str | None) -> str:
    """The model reference (default: the config's registered model and alias), with Ray
    started and MLflow pointed at the config's tracking store."""
    model_ref = model_arg or f"models:/{config.registry.model_name}@{config.registry.alias}"
    init_ray(address)
    from workflows.mlflow_tracking import client_for, resolve_tracking_uri

    client_for(resolve_tracking_uri(config))
    return model_ref
