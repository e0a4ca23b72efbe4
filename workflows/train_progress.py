"""What a training run prints to the console while it runs: one line per progress interval and
per epoch (:class:`EpochProgress`), flushed at once so ``ray job logs`` shows it live."""

from __future__ import annotations

import sys
import time

import numpy as np

from pose2seg.config import Config


def say(line: str) -> None:
    """One console line from a Train worker. Not ``print``: Ray Train V2 patches it in its
    workers to log through Train's logger and, when something wrapped ``sys.stdout``, to print
    as well, so the driver's console showed every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class EpochProgress:
    """Progress inside an epoch (rank 0): a line every ``train.progress_every_steps`` steps
    and/or every ``train.progress_every_seconds`` seconds, and the step loss to MLflow every
    ``train.mlflow_loss_every_steps`` steps."""

    def __init__(
        self,
        config: Config,
        *,
        epoch: int,
        steps_per_epoch: int,
        first_epoch: int,
        run_t0: float,
        metrics_log=None,
        enabled: bool = True,
        clock=time.time,
        echo=None,
        sink: list | None = None,
    ):
        self.config = config
        self.epoch = epoch
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.first_epoch = first_epoch
        self.run_t0 = run_t0
        self.metrics_log = metrics_log  # a mlflow_buffer.MetricBuffer, or None
        self.enabled = enabled
        self.clock = clock
        self.echo = echo or say
        # (step, metrics) of the step losses: logged by the caller with the epoch's checkpoint
        # (a re-run epoch must not log a step twice); None logs at once.
        self.sink = sink
        self.t0 = clock()
        self.last_print = self.t0
        self.epoch_step = 0
        self.images = 0
        self.window: list[float] = []
        self.mlflow_window: list[float] = []

    def update(self, *, step: int, loss: float, images: int) -> str | None:
        """Record one step (``step``: global step count after it; ``images``: images of the
        step over all ranks). Returns the printed line, if any."""
        if not self.enabled:
            return None
        tc = self.config.train
        self.epoch_step += 1
        self.images += images
        self.window.append(loss)
        self.mlflow_window.append(loss)
        every = tc.mlflow_loss_every_steps
        if self.metrics_log is not None and every > 0 and step % every == 0:
            values = {"step_loss": float(np.mean(self.mlflow_window))}
            if self.sink is not None:
                self.sink.append((step, values))
            else:
                self.metrics_log.log(values, step=step)
            self.mlflow_window = []
        now = self.clock()
        by_steps = tc.progress_every_steps > 0 and self.epoch_step % tc.progress_every_steps == 0
        by_time = (
            tc.progress_every_seconds > 0 and now - self.last_print >= tc.progress_every_seconds
        )
        if not (by_steps or by_time) or self.epoch_step >= self.steps_per_epoch:
            return None
        elapsed = max(now - self.t0, 1e-9)
        per_step = elapsed / self.epoch_step
        epoch_eta = per_step * (self.steps_per_epoch - self.epoch_step)
        # The run's ETA: this epoch's pace for the rest of the epochs (validation not included).
        epochs_left = self.config.train.epochs - self.epoch - 1
        run_eta = epoch_eta + epochs_left * per_step * self.steps_per_epoch
        line = (
            f"[pose2seg] epoch {self.epoch + 1}/{self.config.train.epochs}  "
            f"step {self.epoch_step}/{self.steps_per_epoch}  loss {np.mean(self.window):.4f}  "
            f"{self.images / elapsed:.1f} img/s  ETA epoch {_mmss(epoch_eta)}  "
            f"run {_mmss(run_eta)} (+ validation)"
        )
        self.echo(line)
        self.window = []
        self.last_print = now
        return line


def _mmss(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"
