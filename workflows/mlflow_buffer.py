"""MLflow calls that never stall training: bounded HTTP waits for every MLflow client of a
process (:func:`bound_http_waits`), rank 0's metrics buffered while the tracking server is
unreachable (:class:`MetricBuffer`), and the test of "unreachable" (:func:`is_unreachable`).

A tracking server that dies would otherwise cost each MLflow call MLflow's default of 7
retries with backoff (4-5 minutes), fail the Ray Train worker that made it and restart the
worker group. Here rank 0 keeps what it could not deliver, warns once, tries again at most every
``retry_every_s`` seconds, and delivers everything when the server answers again; the driver
backfills the epoch metrics from the checkpoint history at the end
(:func:`backfill_epoch_metrics`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

HTTP_WAIT_DEFAULTS: dict[str, str] = {
    # seconds for the connect and for each read of one request (MLflow's default: 120); not a
    # limit on a whole upload, but the server answers a proxied artifact upload only once it
    # stored it: kept well above what a model upload needs
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # retries of one request (MLflow's default: 7, about 4 minutes with backoff)
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    # backoff factor between them (MLflow's default: 2)
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
"""MLflow's own environment variables (MLflow 3.17 reads them at every request), set by the
project unless the user set them: a call to a server that is gone (connection refused) fails
within seconds, one to a server that accepts and never answers within about 90 s."""


def bound_http_waits() -> None:
    """Give this process's MLflow clients bounded waits (:data:`HTTP_WAIT_DEFAULTS`), keeping
    any value the user set in the environment."""
    for key, value in HTTP_WAIT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def is_unreachable(exc: BaseException) -> bool:
    """An MLflow call failed because the tracking server did not answer (refused, reset, timed
    out, or a 5xx after MLflow's retries), not because the request was wrong."""
    import requests

    if isinstance(exc, requests.exceptions.RequestException | ConnectionError | TimeoutError):
        return True
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    text = str(getattr(exc, "message", "") or exc)
    return text.startswith("API request to") or getattr(exc, "error_code", "") in (
        "TEMPORARILY_UNAVAILABLE",
        "REQUEST_LIMIT_EXCEEDED",
    )


def _stderr_line(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class MetricBuffer:
    """The metrics of one MLflow run (``handle``: a ``mlflow_tracking.RunHandle``; ``label``:
    the server as printed, e.g. its redacted URI), delivered
    at once while the tracking server answers and kept while it does not.

    ``log`` never raises for an unreachable server: the first failure prints one warning line,
    later attempts (at most one per ``retry_every_s``) stay quiet until one succeeds, which
    prints one line saying how many metrics were delivered late. Errors that are not about
    reachability (a rejected value) raise as before. ``pending`` is what is still undelivered.
    """

    def __init__(
        self,
        handle: Any,
        *,
        retry_every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        echo: Callable[[str], None] = _stderr_line,
        client: Any = None,
        label: str | None = None,
    ) -> None:
        self.handle = handle
        self.label = label or str(handle.tracking_uri)  # the server as the user may read it
        self.retry_every_s = float(retry_every_s)
        self.clock = clock
        self.echo = echo
        self._client = client
        self.pending: list[Any] = []  # mlflow.entities.Metric
        self.superseded: list[tuple[str, int, float, float]] = []
        """(key, step, value the run holds, value left out) for each value left out because the
        run already held a different one at that step: an epoch trained again."""
        self.unreachable_since: float | None = None
        self._last_try = -math.inf

    def _mlflow_client(self):
        if self._client is None:
            from mlflow import MlflowClient

            bound_http_waits()
            self._client = MlflowClient(tracking_uri=self.handle.tracking_uri)
        return self._client

    def log(self, metrics: dict[str, Any], *, step: int) -> bool:
        """Queue the finite numeric ``metrics`` at ``step`` and try to deliver the queue.
        Returns True when nothing is left undelivered."""
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self.pending.extend(
            Metric(key, float(value), now_ms, int(step))
            for key, value in metrics.items()
            if isinstance(value, int | float) and math.isfinite(float(value))
        )
        return self.flush()

    def flush(self, *, force: bool = False) -> bool:
        """Try to deliver the queue (while the server is down, at most once per
        ``retry_every_s`` unless ``force``). Returns True when the queue is empty."""
        if not self.pending:
            return True
        now = self.clock()
        if self.unreachable_since is not None and not force:
            if now - self._last_try < self.retry_every_s:
                return False
        try:
            client = self._mlflow_client()
            self._drop_logged(client)
            while self.pending:
                chunk = self.pending[:1000]  # MLflow takes at most 1000 metrics per batch
                client.log_batch(self.handle.run_id, metrics=chunk)
                del self.pending[: len(chunk)]
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            self._last_try = self.clock()  # the next attempt a full interval after this one
            if self.unreachable_since is None:
                self.unreachable_since = now
                self.echo(
                    f"[pose2seg] warning: MLflow tracking server {self.label} is "
                    f"unreachable; training goes on and {len(self.pending)} metrics are kept "
                    f"to be delivered when it answers (retried every {self.retry_every_s:g} s)"
                )
            return False
        if self.unreachable_since is not None:
            self.echo(
                f"[pose2seg] MLflow tracking server {self.label} answers again: "
                "buffered metrics delivered"
            )
            self.unreachable_since = None
        return True

    def _drop_logged(self, client: Any) -> None:
        """Leave out what the run already holds at the same step: an epoch trained again after
        a worker died between reporting its checkpoint and Ray Train registering it (the run
        goes back to the previous registered checkpoint), or a batch whose answer timed out
        after the server had stored it. MLflow then holds every step of a metric once."""
        keys = {m.key for m in self.pending}
        logged = {
            (key, m.step): m.value
            for key in keys
            for m in client.get_metric_history(self.handle.run_id, key)
        }
        kept = []
        for m in self.pending:
            held = logged.get((m.key, m.step))
            if held is None:
                kept.append(m)
            elif held != m.value:
                self.superseded.append((m.key, m.step, held, m.value))
        self.pending = kept

    def superseded_steps(self, key: str) -> list[int]:
        """The steps of ``key`` whose value in the run is an earlier attempt's, not this one's."""
        return sorted({step for k, step, _, _ in self.superseded if k == key})

    def undelivered(self) -> list[tuple[str, float, int, int]]:
        """What is still pending, as plain tuples (key, value, timestamp ms, step)."""
        return [(m.key, m.value, m.timestamp, m.step) for m in self.pending]


def backfill_epoch_metrics(
    handle,
    history: list[dict[str, float]],
    *,
    undelivered: list[tuple[str, float, int, int]] = (),
) -> int:
    """Log what the run lacks: every metric of the checkpoint ``history`` (one dict per epoch,
    logged at step = its ``epoch``) and the ``undelivered`` (key, value, timestamp ms, step)
    rank 0 could not deliver, each only where the run has no value of that key at that step.
    Epochs whose metrics were lost (a driver killed between the checkpoint and the log, a
    tracking server down) are then in the run once. Returns how many values were logged."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    bound_http_waits()
    client = MlflowClient(tracking_uri=handle.tracking_uri)
    now = int(time.time() * 1000)
    wanted: dict[str, list[Metric]] = {}
    for row in history:
        step = int(row.get("epoch", 0))
        for key, value in row.items():
            if isinstance(value, int | float) and math.isfinite(float(value)):
                wanted.setdefault(key, []).append(Metric(key, float(value), now, step))
    for key, value, timestamp, step in undelivered:
        wanted.setdefault(key, []).append(Metric(key, float(value), int(timestamp), int(step)))
    missing = []
    for key, metrics in wanted.items():
        logged = {m.step for m in client.get_metric_history(handle.run_id, key)}
        for metric in metrics:
            if metric.step not in logged:
                logged.add(metric.step)
                missing.append(metric)
    for i in range(0, len(missing), 1000):
        client.log_batch(handle.run_id, metrics=missing[i : i + 1000])
    return len(missing)
