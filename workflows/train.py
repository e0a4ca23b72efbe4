"""Train Pose2Seg on Ray Train, track it in MLflow, register the model.

python workflows/train.py                               # the default synthetic CPU run
python workflows/train.py --config configs/cocopersons.yaml
python workflows/train.py --resume RUN_NAME             # continue a stored run (same MLflow run)
ray job submit --working-dir . -- python workflows/train.py --config configs/cocopersons.yaml
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # `python workflows/train.py` from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workflows.cli import add_config_args, command, config_from_args, init_ray  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument(
        "--resume", metavar="RUN_NAME", help="continue this earlier run from its last checkpoint"
    )
    parser.add_argument(
        "--no-register", action="store_true", help="log the model but do not register it"
    )
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    from workflows.train_driver import check_new_run_name, check_resumable, run_training

    if args.resume:
        config = config.with_overrides({"train.run_name": args.resume})
        check_resumable(config, args.resume)  # fail at once, before Ray starts
    elif config.train.run_name:
        check_new_run_name(config, config.train.run_name)
    previous = _interrupt_on_sigterm()
    try:
        init_ray(args.address)
        outcome = run_training(
            config, resume=args.resume, register=False if args.no_register else None
        )
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)
    print_outcome(outcome)
    return 0


def _interrupt_on_sigterm():
    """`ray job stop` and Kubernetes send SIGTERM: turn it into KeyboardInterrupt so the
    MLflow run is ended (KILLED) instead of being left RUNNING."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def print_outcome(outcome) -> None:
    m = outcome.metrics
    print()
    print("=" * 72)
    print(f"run name          {outcome.run_name}   (resume with --resume {outcome.run_name})")
    print(
        f"val segm AP       {m.get('best_val_segm_ap', float('nan')):.4f}  (best epoch {m.get('best_epoch')}, pycocotools, GT keypoints)"
    )
    print(f"val occluded AP   {m.get('val_occluded_segm_ap', float('nan')):.4f}  (last epoch)")
    print(f"checkpoint        {outcome.checkpoint_path}")
    print(f"MLflow run id     {outcome.mlflow_run_id}")
    reg = outcome.registration
    if reg is not None:
        moved = (
            "moved to it"
            if reg.alias_moved
            else f"kept on version {reg.previous_version} (AP {reg.previous_ap:.4f})"
        )
        print(f"registered model  {reg.name} version {reg.version}; alias @{reg.alias} {moved}")
        print(f"load it with      mlflow.pyfunc.load_model('models:/{reg.name}@{reg.alias}')")
    if outcome.tracking_uri and outcome.tracking_uri.startswith("sqlite:"):
        print(
            f"MLflow UI         mlflow ui --backend-store-uri {outcome.tracking_uri}  (then open http://127.0.0.1:5000)"
        )
    print("=" * 72)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
