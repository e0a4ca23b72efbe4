"""The per-epoch, per-rank training input (no Ray): file manifest, seeded slices, slice reads;
and the progress lines inside an epoch."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pose2seg.config import Config
from preprocessing.epoch_reader import (
    RankStream,
    batches_per_epoch,
    epoch_file_order,
    epoch_slices,
    equal_batches,
    list_parquet,
    read_slices,
    rows_per_rank,
)

MANIFEST = [(f"f{i}.parquet", n) for i, n in enumerate([32, 32, 32, 32, 32, 17])]


def _rows(slices):
    return [(u, r) for u, a, b in slices for r in range(a, b)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_every_row_is_read_exactly_once_per_epoch_whatever_the_world_size(world):
    total = sum(n for _, n in MANIFEST)  # 177: no world size above 1 divides it
    seen = []
    for rank in range(world):
        rows = _rows(epoch_slices(MANIFEST, epoch=3, seed=7, rank=rank, world=world))
        assert len(rows) == rows_per_rank(MANIFEST, world, rank)
        assert total // world <= len(rows) <= total // world + 1
        seen.extend(rows)
    assert len(set(seen)) == len(seen) == total  # every row once, none left out


def test_file_order_is_seeded_and_changes_every_epoch():
    orders = [epoch_file_order(MANIFEST, epoch=e, seed=0) for e in range(4)]
    assert orders[0] == epoch_file_order(MANIFEST, epoch=0, seed=0)
    assert len({tuple(u for u, _ in o) for o in orders}) > 1
    assert epoch_file_order(MANIFEST, epoch=0, seed=1) != orders[0] or (
        epoch_file_order(MANIFEST, epoch=1, seed=1) != orders[1]
    )
    assert sorted(orders[2]) == sorted(MANIFEST)


def test_slices_reject_a_bad_rank():
    with pytest.raises(ValueError, match="rank 2"):
        epoch_slices(MANIFEST, epoch=0, seed=0, rank=2, world=2)


def test_manifest_and_slice_reads_from_real_parquet(tmp_path):
    for i, n in enumerate([5, 3]):
        pq.write_table(
            pa.table({"v": list(range(100 * i, 100 * i + n))}), tmp_path / f"{i}.parquet"
        )
    (tmp_path / "notes.txt").write_text("not parquet")
    manifest = list_parquet(str(tmp_path))
    assert [(p.rsplit("/", 1)[-1], n) for p, n in manifest] == [("0.parquet", 5), ("1.parquet", 3)]
    batch = pa.table({"uri": [manifest[0][0], manifest[1][0]], "start": [1, 0], "stop": [4, 2]})
    assert read_slices(batch).column("v").to_pylist() == [1, 2, 3, 100, 101]
    bad = pa.table({"uri": [manifest[1][0]], "start": [0], "stop": [9]})
    with pytest.raises(ValueError, match="1.parquet: has 3 rows"):
        read_slices(bad)


def test_manifest_of_an_empty_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        list_parquet(str(tmp_path))


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_progress_prints_by_steps_and_time_with_eta():
    from workflows.train_progress import EpochProgress

    cfg = Config().with_overrides(
        {"train.epochs": 3, "train.progress_every_steps": 4, "train.progress_every_seconds": 30}
    )
    clock, lines = _Clock(), []
    progress = EpochProgress(
        cfg,
        epoch=0,
        steps_per_epoch=10,
        first_epoch=0,
        run_t0=clock.t,
        clock=clock,
        echo=lines.append,
    )
    printed = []
    for step in range(1, 11):
        clock.t += 2.0  # 2 s per step of 16 images
        printed.append(progress.update(step=step, loss=1.0 / step, images=16))
    assert [i + 1 for i, p in enumerate(printed) if p] == [4, 8]  # never on the last step
    assert lines[0].startswith("[pose2seg] epoch 1/3  step 4/10  loss 0.5208")
    assert "8.0 img/s" in lines[0]
    # 6 steps left at 2 s -> 0:12; the run: + 2 more epochs of 10 steps -> 0:52.
    assert "ETA epoch 0:12" in lines[0] and "run 0:52" in lines[0]
    # By time only: a slow step prints at once.
    cfg_t = cfg.with_overrides({"train.progress_every_steps": 0})
    progress = EpochProgress(
        cfg_t,
        epoch=2,
        steps_per_epoch=10,
        first_epoch=0,
        run_t0=clock.t,
        clock=clock,
        echo=lambda line: None,
    )
    clock.t += 5
    assert progress.update(step=1, loss=1.0, images=8) is None
    clock.t += 31
    assert "epoch 3/3  step 2/10" in progress.update(step=2, loss=1.0, images=8)


def test_step_losses_wait_for_the_epochs_checkpoint():
    """With a sink (the training loop's), step losses are held for the epoch's end, where they
    are logged once its checkpoint is stored: a re-run epoch never logs a step twice."""
    from workflows.train_progress import EpochProgress

    class Log:  # stands in for rank 0's mlflow_buffer.MetricBuffer
        def __init__(self):
            self.steps = []

        def log(self, metrics, *, step):
            self.steps.append(step)

    log = Log()
    cfg = Config().with_overrides({"train.mlflow_loss_every_steps": 2})
    sink: list = []
    progress = EpochProgress(
        cfg, epoch=0, steps_per_epoch=4, first_epoch=0, run_t0=0.0, metrics_log=log, sink=sink
    )
    for step in range(1, 5):
        progress.update(step=step, loss=float(step), images=1)
    assert log.steps == []  # nothing logged mid-epoch
    assert sink == [(2, {"step_loss": 1.5}), (4, {"step_loss": 3.5})]
    direct = EpochProgress(
        cfg, epoch=0, steps_per_epoch=4, first_epoch=0, run_t0=0.0, metrics_log=log
    )
    direct.update(step=2, loss=1.0, images=1)
    assert log.steps == [2]  # without a sink: at once (as before)


def test_progress_is_silent_off_rank_zero():
    from workflows.train_progress import EpochProgress

    cfg = Config().with_overrides({"train.progress_every_steps": 1})
    progress = EpochProgress(
        cfg,
        epoch=0,
        steps_per_epoch=5,
        first_epoch=0,
        run_t0=0.0,
        enabled=False,
        echo=lambda line: pytest.fail("printed"),
    )
    assert progress.update(step=1, loss=1.0, images=1) is None


def _ids(batches):
    return [int(v) for b in batches for v in b["id"]]


def test_shuffle_buffer_is_seeded_complete_and_mixes():
    import numpy as np

    from preprocessing.epoch_reader import shuffled_batches

    rows = [{"id": i, "blob": b"x" * i} for i in range(50)]

    def run(seed, buffer=16):
        rng = np.random.default_rng(seed)
        return list(shuffled_batches(iter(rows), rng=rng, buffer_size=buffer, batch_size=8))

    first = run(0)
    assert [len(b["id"]) for b in first] == [8] * 6 + [2]
    assert sorted(_ids(first)) == list(range(50))  # every row once
    assert _ids(first) == _ids(run(0))  # seeded
    assert _ids(first) != _ids(run(1))
    assert _ids(first) != list(range(50))  # mixed
    assert first[0]["blob"][0] == b"x" * int(first[0]["id"][0])  # columns stay aligned
    # No buffer: the order of the rows as they came.
    assert _ids(run(0, buffer=0)) == list(range(50))


def _parquet_files(tmp_path, sizes):
    paths = []
    for i, n in enumerate(sizes):
        path = tmp_path / f"{i}.parquet"
        pq.write_table(
            pa.table(
                {"v": list(range(100 * i, 100 * i + n)), "blob": [b"x" * k for k in range(n)]}
            ),
            path,
        )
        paths.append(str(path))
    return paths


def test_thread_reader_gives_the_slices_rows_in_order(tmp_path):
    from preprocessing.epoch_reader import thread_rows

    a, b = _parquet_files(tmp_path, [5, 4])
    rows = list(thread_rows([(b, 1, 3), (a, 0, 5), (b, 3, 4)], prefetch=1))
    assert [r["v"] for r in rows] == [101, 102, 0, 1, 2, 3, 4, 103]
    assert rows[1]["blob"] == b"xx"


def test_thread_reader_stays_bounded_and_stops_when_closed(tmp_path, monkeypatch):
    import threading
    import time

    from preprocessing import epoch_reader

    (path,) = _parquet_files(tmp_path, [3])
    reads = []
    real = epoch_reader.read_slice

    def counting(uri, a, b):
        reads.append((a, b))
        return real(uri, a, b)

    monkeypatch.setattr(epoch_reader, "read_slice", counting)
    rows = epoch_reader.thread_rows([(path, 0, 1)] * 50, prefetch=2)
    assert next(rows)["v"] == 0
    time.sleep(0.5)
    # 1 consumed + 2 queued + 1 waiting to be queued, not the 50 slices.
    assert len(reads) <= 4
    rows.close()
    time.sleep(0.5)
    assert not any(t.name == "pose2seg-train-reader" for t in threading.enumerate())


def test_thread_reader_raises_a_read_error_in_the_consumer_naming_the_file(tmp_path):
    from preprocessing.epoch_reader import thread_rows

    (path,) = _parquet_files(tmp_path, [3])
    rows = thread_rows([(path, 0, 3), (path, 0, 9)], prefetch=2)
    assert [r["v"] for r in (next(rows), next(rows), next(rows))] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"0\.parquet: has 3 rows, expected at least 9"):
        next(rows)


def test_an_unknown_reader_is_a_config_error():
    from pose2seg.config import ConfigError

    with pytest.raises(ConfigError, match="train.input_reader"):
        Config().with_overrides({"train.input_reader": "spark"})


def test_equal_batches_splits_the_last_batch_of_a_short_rank():
    import numpy as np

    batches = [{"v": np.arange(4)}, {"v": np.arange(4, 8)}]
    out = list(equal_batches(iter(batches), count=3))
    assert [list(b["v"]) for b in out] == [[0, 1, 2, 3], [4, 5], [6, 7]]
    assert [list(b["v"]) for b in equal_batches(iter(batches), count=2)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [2, 4])
def test_rank_streams_read_every_row_once_in_equal_step_counts(tmp_path, world, batch_size):
    """A world size changed at an epoch boundary (an elastic resize, a restart on fewer nodes):
    the real per-rank streams of each epoch read every stored row exactly once, and every rank
    takes the same number of steps (DDP would hang otherwise)."""
    sizes = [8, 8, 5]  # 21 rows: uneven shares for world 2, 4 (and 3 with batch 4)
    manifest = []
    for i, n in enumerate(sizes):
        path = tmp_path / f"{i}.parquet"
        pq.write_table(pa.table({"v": list(range(100 * i, 100 * i + n))}), path)
        manifest.append((str(path), n))
    for epoch in (0, 1):
        seen, steps = [], set()
        for rank in range(world):
            stream = RankStream(
                manifest,
                seed=3,
                first_epoch=epoch,
                epochs=epoch + 1,
                rank=rank,
                world=world,
                read_cpus=0.25,
                concurrency=1,
            )
            batches = list(stream.epoch(epoch, batch_size=batch_size, buffer_size=4))
            steps.add(len(batches))
            assert all(1 <= len(b["v"]) <= batch_size for b in batches)
            seen.extend(int(v) for b in batches for v in b["v"])
        assert steps == {batches_per_epoch(sum(sizes), world=world, batch_size=batch_size)}
        assert sorted(seen) == sorted(
            v for i, n in enumerate(sizes) for v in range(100 * i, 100 * i + n)
        )
