"""Reproducible training on a real local Ray (2 workers): the same config and seed give the
same per-epoch losses, also when a worker is killed and the run restarts from its checkpoint; a
resumed run continues from its checkpoint without training its epochs again; the step loss
reaches MLflow (with each epoch's checkpoint, once per step)."""

from __future__ import annotations

import pytest

from tests.helpers import kill_a_train_worker, tiny_config

pytestmark = pytest.mark.integration


def test_same_seed_same_losses_through_a_killed_worker_and_a_resume(ray_session, tmp_path):
    from mlflow import MlflowClient

    from workflows.train_driver import run_training

    config = tiny_config(
        tmp_path,
        **{
            "train.epochs": 2,
            "registry.register": False,
            "train.mlflow_loss_every_steps": 1,
            "train.progress_every_steps": 1,
        },
    )
    first = run_training(config)
    losses = [h["train_loss"] for h in first.history]
    assert len(losses) == 2
    client = MlflowClient(tracking_uri=config.registry.tracking_uri)
    steps = client.get_metric_history(first.mlflow_run_id, "step_loss")
    # 16 images, 2 workers x 4 per step -> 2 steps per epoch, logged every step.
    assert sorted(m.step for m in steps) == [1, 2, 3, 4]
    assert all(m.value > 0 for m in steps)

    # The same run again, with a Train worker SIGKILLed once epoch 1's checkpoint is stored:
    # the group restarts from that checkpoint, each epoch once in the history (issue 27's
    # battery: "a killed Train worker gives the uninterrupted run's losses").
    again = config.with_overrides({"train.storage_path": str(tmp_path / "runs-killed")})
    with kill_a_train_worker(tmp_path / "runs-killed", after_epoch=1) as kill:
        second = run_training(again)
    assert kill["killed"], "no Ray Train worker was killed"
    assert second.metrics["epoch"] == 2 and second.registration is None
    assert [int(h["epoch"]) for h in second.history] == [1, 2]
    # Bit for bit: same files per rank, same order, same shuffle buffer, same init, and the
    # restored model, optimizer and schedule after the restart.
    assert [h["train_loss"] for h in second.history] == losses

    # --resume of the finished run with one epoch more: epochs 1-2 come from its checkpoint,
    # not trained again (their records, wall times included, are the first run's), into the
    # same MLflow run.
    more = run_training(config.with_overrides({"train.epochs": 3}), resume=first.run_name)
    assert [int(h["epoch"]) for h in more.history] == [1, 2, 3]
    def record(h):  # (NaN fields, e.g. the AP of an absent size range, never compare equal)
        return h["epoch"], h["train_loss"], h["train_seconds"], h["val_seconds"]

    assert [record(h) for h in more.history[:2]] == [record(h) for h in first.history]
    assert more.mlflow_run_id == first.mlflow_run_id

    other = run_training(config.with_overrides({"train.seed": 1, "train.epochs": 1}))
    assert other.history[0]["train_loss"] != losses[0]


def test_thread_and_ray_data_readers_give_the_same_batches(ray_session, tmp_path):
    """The two ``train.input_reader`` values are the same rows in the same order, per rank and
    per epoch (so the default can change without changing what a run trains on)."""
    import numpy as np

    from workflows.train_driver import prepare_data
    from workflows.train_input import decode_batch, iter_train_batches

    config = tiny_config(tmp_path, **{"train.shuffle_buffer_size": 4})
    files = prepare_data(config).train_files
    assert len(files) > 1  # several files, so the per-epoch file order matters

    def batches(reader, epoch, rank):
        cfg = config.with_overrides({"train.input_reader": reader})
        out = iter_train_batches(files, config=cfg, epoch=epoch, rank=rank, world=2)
        return [decode_batch(b) for b in out]

    orders = []
    for epoch in (0, 1):
        for rank in (0, 1):
            threaded, ray_data = batches("thread", epoch, rank), batches("ray_data", epoch, rank)
            ids = [[r["image_id"] for r in b] for b in threaded]
            assert ids == [[r["image_id"] for r in b] for b in ray_data]
            for mine, theirs in zip(threaded, ray_data, strict=True):
                for r1, r2 in zip(mine, theirs, strict=True):
                    assert np.array_equal(r1["image"], r2["image"])
                    assert np.array_equal(r1["skeleton"], r2["skeleton"])
                    assert np.array_equal(r1["affines"], r2["affines"])
            orders.append(ids)
    assert orders[0] != orders[2]  # a new order every epoch
