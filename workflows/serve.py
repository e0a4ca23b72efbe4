"""Serve a registered Pose2Seg model over HTTP with Ray Serve.

    python workflows/serve.py                                   # models:/pose2seg@champion, local Ray
    python workflows/serve.py --model models:/pose2seg/3 --set serve.num_replicas=2
    python workflows/serve.py --address auto --detach           # deploy on a running cluster, return

The application (``workflows/serve_app.py``) answers ``POST http://HOST:PORT/`` with a JSON
image (+ keypoints, or none: the keypoint detector finds the people) and returns each person's
COCO RLE mask and score; see docs/SERVING.md. ``serve.*`` keys size it (replicas or
autoscaling, CPUs/GPU per replica, batching, host and port).

A new champion: run the same command again. ``models:/NAME@ALIAS`` is resolved here to the
version it names now and the application is redeployed under the same name (Ray Serve starts
replicas of the new version, then stops the old ones).
"""

from __future__ import annotations

import argparse
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


def pin_model_version(model_ref: str, tracking_uri: str) -> str:
    """``models:/NAME@ALIAS`` -> ``models:/NAME/VERSION`` (the version the alias names now), so
    that a redeploy after the alias moved changes what the replicas load; other refs unchanged."""
    if not (model_ref.startswith("models:/") and "@" in model_ref):
        return model_ref
    from workflows.mlflow_tracking import client_for
    from workflows.serve_app import registry_version

    name = model_ref[len("models:/") :].split("@", 1)[0]
    return f"models:/{name}/{registry_version(client_for(tracking_uri), model_ref)}"


def run_serve(config: Config, *, model_ref: str) -> dict[str, Any]:
    """Deploy (or redeploy) the application on the connected Ray cluster; returns where it
    answers and what it serves. Ray must be initialised."""
    from ray import serve

    from workflows.mlflow_tracking import resolve_tracking_uri
    from workflows.serve_app import build_app

    s = config.serve
    tracking_uri = resolve_tracking_uri(config)
    pinned = pin_model_version(model_ref, tracking_uri)
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(
        build_app(config, model_ref=pinned, tracking_uri=tracking_uri),
        name=s.app_name,
        route_prefix=s.route_prefix,
    )
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    return {
        "url": f"http://{host}:{s.port}{s.route_prefix}",
        "model": pinned,
        "requested": model_ref,
        "app_name": s.app_name,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument(
        "--model",
        default=None,
        help="models:/NAME@ALIAS (default: the config's), models:/NAME/VERSION, runs:/..., "
        "an MLflow model folder or a checkpoint folder",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="return once deployed (on a cluster started with `ray start`); default: serve "
        "until Ctrl-C, then shut Serve down",
    )
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    from workflows.mlflow_tracking import resolve_tracking_uri
    from workflows.serve_app import check_model_ref

    # A model that does not exist is one line and exit 2 now, not a failed deployment later.
    check_model_ref(
        args.model or f"models:/{config.registry.model_name}@{config.registry.alias}",
        resolve_tracking_uri(config),
    )
    model_ref = resolve_model_and_connect(args.model, config, args.address)
    info = run_serve(config, model_ref=model_ref)
    print(f"serving {info['model']} (asked for {info['requested']}) at {info['url']}")
    print(
        f"try: curl -s {info['url']} -H 'Content-Type: application/json' "
        '-d "{\\"image\\": \\"$(base64 -w0 image.jpg)\\"}"'
    )
    if args.detach:
        print(
            f"detached; stop it with: serve shutdown -y  (or `serve.delete('{info['app_name']}')`)"
        )
        return 0
    import signal
    import time

    from ray import serve

    def stop(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM (kill, Kubernetes, docker stop) shuts Serve down like Ctrl-C; so does SIGINT where
    # a non-interactive shell started this process with SIGINT ignored.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("serving until Ctrl-C", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting Serve down", flush=True)
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
