"""Reliability of the data side: a silent S3 endpoint, a corrupt Parquet shard, a corrupt
checkpoint on ``--resume`` (issue 27, items 4, 8 and 10). Each test is bounded in time."""

from __future__ import annotations

import socket
import threading
import time


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
