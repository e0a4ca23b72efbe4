"""Reliability of the data side: a silent S3 endpoint, a corrupt Parquet shard, a corrupt
checkpoint on ``--resume`` (issue 27, items 4, 8 and 10). Each test is bounded in time."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


class SilentServer:
    """A TCP server on loopback that accepts connections and never answers (until closed)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)  # held open, never read from or written to

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def test_preprocess_against_a_silent_s3_endpoint_fails_in_bounded_time(
    ray_session, capsys, monkeypatch
):
    from workflows import preprocess

    monkeypatch.delenv("POSE2SEG_DEBUG", raising=False)
    monkeypatch.setenv("POSE2SEG_S3_CONNECT_TIMEOUT_S", "1")
    monkeypatch.setenv("POSE2SEG_S3_READ_TIMEOUT_S", "1")
    monkeypatch.setenv("POSE2SEG_S3_MAX_ATTEMPTS", "2")
    argv = ["--set", "data.source=coco", "--set", "data.root=s3://bucket/data"]
    outcome: dict[str, object] = {}
    with SilentServer() as server:
        endpoint = f"http://127.0.0.1:{server.port}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        t0 = time.monotonic()
        # In a thread so that a hang fails this test instead of the whole session.
        worker = threading.Thread(
            target=lambda: outcome.update(code=preprocess.main(argv)), daemon=True
        )
        worker.start()
        worker.join(timeout=60)
        elapsed = time.monotonic() - t0
        assert not worker.is_alive(), "preprocess.py hung on an S3 endpoint that never answers"
        assert server.accepted, "the command never connected to the endpoint"
    assert outcome["code"] == 2
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1]
    assert endpoint in last and "never answered" in last, last
    assert "s3://bucket/data" in last and "Object" in last, last  # the operation and the URI
    # 2 attempts of a 1 s read timeout each, plus backoff; far below the 60 s bound.
    assert elapsed < 30, elapsed


def _corrupt_pages(path) -> None:
    """Scramble the bytes between the header and the footer: the footer (row counts) still
    reads, the pages do not decode."""
    data = bytearray(path.read_bytes())
    for i in range(64, len(data) // 2, 5):
        data[i] = (data[i] * 31 + 7) % 256
    path.write_bytes(bytes(data))


def test_a_corrupt_parquet_shard_is_named_and_not_retried(ray_session, tmp_path):
    import ray.train

    from preprocessing.epoch_reader import UnreadableParquetError, list_parquet
    from preprocessing.pipeline import preprocess_dataset, processed_dir
    from tests.helpers import tiny_config
    from workflows import cli
    from workflows.train_driver import run_training

    # Retries allowed: a data error must not use them.
    config = tiny_config(tmp_path, **{"train.max_failures": 2, "registry.register": False})
    preprocess_dataset(config)
    shards = [Path(uri) for uri, _ in list_parquet(processed_dir(config, "train"))]
    intact = [p.read_bytes() for p in shards]

    # Truncated: found while the driver lists the shards, before any worker starts.
    shards[0].write_bytes(intact[0][:200])
    with pytest.raises(ValueError) as info:
        run_training(config)
    line = cli.error_line(cli.root_cause(info.value))
    assert str(shards[0]) in line and "Parquet magic bytes not found" in line, line

    # Corrupt pages (the footer reads): the first worker to read one fails, and the run ends
    # there, as a ControllerError (a retried failure ends as a WorkerGroupError after
    # train.max_failures restarts) carrying the reader's error.
    for path, data in zip(shards, intact, strict=True):
        path.write_bytes(data)
        _corrupt_pages(path)
    with pytest.raises(ray.train.ControllerError) as info:
        run_training(config)
    cause = cli.root_cause(info.value)
    assert isinstance(cause, UnreadableParquetError), repr(cause)
    line = cli.error_line(cause)
    assert any(str(p) in line for p in shards) and "unreadable" in line, line
    assert "\n" not in line


def test_resume_falls_back_from_a_corrupt_checkpoint_to_the_newest_readable(
    ray_session, tmp_path, capsys
):
    from tests.helpers import tiny_config
    from workflows.train_driver import run_training

    config = tiny_config(tmp_path, **{"registry.register": False})
    first = run_training(config)
    run_dir = tmp_path / "runs" / first.run_name
    checkpoints = sorted(
        p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")
    )
    assert len(checkpoints) == 2, checkpoints
    corrupt = checkpoints[-1] / "training.pt"
    corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])
    capsys.readouterr()

    resumed = run_training(config, resume=first.run_name)
    out = capsys.readouterr().out.splitlines()
    said = [line for line in out if str(corrupt) in line]
    assert len(said) == 1 and "resuming from" in said[0], out
    assert str(checkpoints[0]) in said[0]  # the epoch-1 checkpoint
    assert any("resuming from the checkpoint of epoch 1" in line for line in out), out
    # Epoch 2 was trained again, from epoch 1's state, and the run finished.
    assert [int(h["epoch"]) for h in resumed.history] == [1, 2]


def _read_parquet(fs, path):
    import ray

    ray.data.read_parquet(path, filesystem=fs).take_all()


def _write_parquet(fs, path):
    import ray

    ray.data.from_items([{"a": 1}]).write_parquet(path, filesystem=fs)  # in a Ray Data task


@pytest.mark.parametrize("operation", [_read_parquet, _write_parquet], ids=["read", "write"])
def test_a_pyarrow_s3_error_inside_ray_data_names_the_endpoint_and_the_uri(
    ray_session, capsys, monkeypatch, operation
):
    """Ray Data's own Parquet reads and writes (``load_split``, preprocessing's output) go
    through pyarrow, whose S3 errors name the operation and the key but not the endpoint."""
    from ray.data import DataContext

    from preprocessing.storage import pyarrow_filesystem
    from workflows.cli import run_main

    monkeypatch.delenv("POSE2SEG_DEBUG", raising=False)
    # Ray Data tries a failed Parquet write 10 times (backoff up to 32 s, about 3 minutes here)
    # when the error is a network one: the message is the point, not Ray Data's patience.
    monkeypatch.setattr(DataContext.get_current(), "retried_io_errors", [])
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("POSE2SEG_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("POSE2SEG_S3_CONNECT_TIMEOUT_S", "2")
    fs, path = pyarrow_filesystem("s3://bucket/processed/val")
    t0 = time.monotonic()
    assert run_main(lambda argv: operation(fs, path), []) == 2
    assert time.monotonic() - t0 < 60
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: S3UnreachableError: S3 endpoint http://127.0.0.1:9 "), last
    assert "s3://bucket/processed/val" in last, last
