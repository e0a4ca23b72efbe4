"""Helpers shared by the tests: a tiny config, and evaluation helpers only tests use."""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from pose2seg.batch import PersonBatch
from pose2seg.config import Config, load_config
from pose2seg.loss import mask_loss

REPO = Path(__file__).resolve().parents[1]


def train_worker_pids() -> list[int]:
    """PIDs of the Ray Train worker processes on this machine (their title ``ray::RayTrainWorker``)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                title = fh.read().split(b"\0")[0]
        except OSError:
            continue
        if title.startswith(b"ray::RayTrainWorker"):
            pids.append(int(entry))
    return sorted(pids)


def _stored_epochs(storage: Path) -> set[int]:
    epochs = set()
    for state in storage.glob("*/checkpoint_*/state.json"):
        with contextlib.suppress(OSError, ValueError):
            epochs.add(int(json.loads(state.read_text())["epoch"]))
    return epochs


@contextlib.contextmanager
def kill_a_train_worker(storage: Path, *, after_epoch: int, timeout_s: float = 300):
    """A real worker failure, no hook in the product: once the run under ``storage`` (its
    ``train.storage_path``) has stored the checkpoint of ``after_epoch``, SIGKILL one Ray Train
    worker. Yields a dict whose ``killed`` holds the PID once it happened."""
    done = threading.Event()
    result: dict = {"killed": None}

    def watch() -> None:
        deadline = time.time() + timeout_s
        while not done.is_set() and time.time() < deadline:
            if any(e >= after_epoch for e in _stored_epochs(storage)):
                for pid in train_worker_pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        result["killed"] = pid
                        return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join(timeout=5)


def tiny_config(tmp_path, **extra) -> Config:
    """A model and dataset small enough for a 2-core CI machine, every part still real."""
    return Config().with_overrides(tiny_overrides(tmp_path, **extra))


def tiny_overrides(tmp_path, **extra) -> dict:
    """The dotted keys of :func:`tiny_config` (also as ``--set`` arguments of a command)."""
    overrides = {
        "data.root": str(tmp_path / "synthetic"),
        "data.processed": str(tmp_path / "processed"),
        "data.input_size": 96,
        "data.images_per_shard": 8,
        "data.synthetic_num_train": 16,
        "data.synthetic_num_val": 8,
        "data.synthetic_image_size": 96,
        "data.synthetic_max_people": 3,
        "model.backbone_depth": 18,
        "model.fpn_channels": 16,
        "model.roi_size": 16,
        "model.num_residual_units": 1,
        "model.seg_channels": 8,
        "model.num_templates": 2,
        "train.num_workers": 2,
        "train.cpus_per_worker": 0.5,
        "train.epochs": 2,
        "train.batch_size": 4,
        "train.warmup_steps": 2,
        "train.storage_path": str(tmp_path / "runs"),
        "registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "registry.model_name": "pose2seg-test",
        "eval.batch_size": 4,
        # The same arithmetic on every CI machine, with or without native bf16 (the default
        # `auto` trains in bf16 where the CPU has it); tests of the precisions set their own.
        "train.mixed_precision": "fp32",
    }
    overrides.update(extra)
    return overrides


def predict_batch_logits(model: nn.Module, batch: PersonBatch) -> torch.Tensor:
    """Logits (P,S,S) of ``batch`` in eval mode under ``no_grad``; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(batch.images, batch.batch_index, batch.affines, batch.skeleton)
    finally:
        model.train(was_training)


def evaluate_batches(
    model: nn.Module, batches: Iterable[PersonBatch], *, threshold: float = 0.5
) -> dict[str, float | int]:
    """Mean loss and aligned-frame mask IoU over batches with targets (eval mode, no_grad).

    Returns:
        ``{"loss": mean per-pixel BCE, "mask_iou": mean per-person IoU, "num_people": P total}``;
        loss and IoU are 0.0 when there was nobody.
    """
    device = next(model.parameters()).device
    total_loss = total_iou = 0.0
    pixels = people = 0
    for batch in batches:
        if batch.targets is None:
            raise ValueError("evaluate_batches: a batch has no targets")
        batch = batch.to(device)
        logits = predict_batch_logits(model, batch).float()
        if batch.num_people == 0:
            continue
        total_loss += float(mask_loss(logits, batch.targets)) * logits.numel()
        pixels += logits.numel()
        predicted = logits > math.log(threshold / (1.0 - threshold))
        truth = batch.targets > 0.5
        inter = (predicted & truth).flatten(1).sum(1).float()
        union = (predicted | truth).flatten(1).sum(1).float()
        # Both empty counts as a perfect match.
        iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
        total_iou += float(iou.sum())
        people += batch.num_people
    return {
        "loss": total_loss / pixels if pixels else 0.0,
        "mask_iou": total_iou / people if people else 0.0,
        "num_people": people,
    }


def check_script_command(argv: list[str], where: str, *, parse: bool = True) -> None:
    """`python workflows/X.py ARGS` or `python benchmarks/X.py ARGS` (any python executable):
    the script exists, its module imports, its own ``build_parser()`` (when it has one) accepts
    ARGS, and its config (the one it names, else the defaults) loads with its ``--set``
    overrides. ``parse=False`` checks the script and its module only (a documented command with
    placeholders)."""
    assert len(argv) >= 2 and re.fullmatch(r"(?:\S*/)?python3?", argv[0]), f"{where}: {argv}"
    match = re.fullmatch(r"(workflows|benchmarks)/(\w+)\.py", argv[1])
    assert match, f"{where}: {argv[1]} is not a workflows/ or benchmarks/ script"
    script = REPO / argv[1]
    assert script.is_file(), f"{where}: {argv[1]} does not exist"
    environ = dict(os.environ)
    try:  # some benchmark scripts set thread and Ray variables when imported
        module = importlib.import_module(f"{match.group(1)}.{match.group(2)}")
    finally:
        os.environ.clear()
        os.environ.update(environ)
    if not parse or not hasattr(module, "build_parser"):
        return
    try:
        args = module.build_parser().parse_args(argv[2:])
    except SystemExit as exc:
        raise AssertionError(f"{where}: {argv[1]} rejects the arguments {argv[2:]}") from exc
    if hasattr(args, "config"):  # the command's config with its overrides: the defaults without one
        config = str(REPO / args.config) if args.config else None
        load_config(config, getattr(args, "overrides", None))
