"""Training input per epoch and per rank: a seeded shuffle of the Parquet files, cut by rows.

The driver lists the training Parquet once per run (:func:`train_manifest`: each file and its
row count, read from the footers). For every epoch, every Train worker computes the same seeded
permutation of the files, lays their rows end to end and takes its own contiguous share of
``total // world`` rows, the first ``total % world`` ranks one more (:func:`epoch_slices`). It streams the shares of all its remaining
epochs as one Ray Data pipeline for the run (:class:`RankStream` over :func:`epoch_dataset`: one
read task per file slice, a fixed number of them in flight, output in a fixed order), cuts it
back into epochs by row count and mixes each epoch in a seeded shuffle buffer
(:func:`shuffled_batches`). So:

- every row is read exactly once per epoch, whatever the world size (an elastic run may change
  it between epochs); ranks differ by at most one row, and every rank takes the same number of
  steps (:func:`equal_batches`), so DDP stays in lock step;
- the file (block) order is different every epoch and the same for the same seed; with the
  worker's seeded local shuffle buffer the whole batch sequence is reproducible;
- nothing is materialised: a rank holds a bounded number of file slices in flight, whatever the
  size of the dataset, and read tasks run anywhere in the cluster;
- no per-epoch file listing and no per-epoch pipeline: Ray Data's own Parquet reader lists and
  footer-reads the folder on every execution (in Ray 2.60 with a pool of actors, each a new
  worker process), and a new pipeline each epoch had Ray start read workers again, so the
  number of Ray worker processes grew with the number of epochs.

Two readers give the same rows in the same order (``train.input_reader``):

- ``thread`` (the default): a background thread of the Train worker reads its slices with
  pyarrow (local disk or ``s3://``), at most ``concurrency`` slices ahead;
- ``ray_data``: one Ray Data execution per run, read tasks anywhere in the cluster. Measured on
  the default run (2 cores, Ray 2.60): while the training loop is the slower side, the
  execution's scheduling thread, which runs inside the Train worker, finds every read task
  held back by backpressure and loops without waiting (``process_completed_tasks`` only blocks
  in ``ray.wait`` when a task is active). It took about half of the worker's sampled CPU time
  (py-spy) and the training steps ran 2.4x slower than once the execution had finished.
  Use it when the readers should run elsewhere than the trainers, e.g. expensive per-row work.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

FileEntry = tuple[str, int]  # (uri, rows)
FileSlice = tuple[str, int, int]  # (uri, first row, end row)


class UnreadableParquetError(ValueError):
    """A Parquet file that cannot be decoded (truncated, corrupt pages): a data error, which
    no retry fixes. The message names the file."""


# Words of pyarrow's OSErrors that mean the storage, not the file, failed (worth a retry).
_TRANSIENT = ("AWS Error", "curlCode", "timed out", "Timeout", "Connection", "connection")


@contextmanager
def parquet_errors(uri: str) -> Iterator[None]:
    """Name ``uri`` in a decoding error: :class:`UnreadableParquetError` for a corrupt or
    truncated file; an OSError naming the file for a storage failure."""
    import pyarrow as pa

    try:
        yield
    except UnreadableParquetError:
        raise
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, OSError) and any(word in reason for word in _TRANSIENT):
            from preprocessing.storage import endpoint_url, is_remote

            where = f" (S3 endpoint {endpoint_url() or 'AWS S3'})" if is_remote(uri) else ""
            raise OSError(f"reading Parquet file {uri}{where} failed: {reason}") from exc
        raise UnreadableParquetError(
            f"Parquet file {uri} is unreadable ({reason}); rebuild the dataset variant with "
            "workflows/preprocess.py --force"
        ) from None


def _footer_rows(uri: str) -> int:
    import pyarrow.parquet as pq

    from preprocessing.storage import pyarrow_filesystem

    fs, path = pyarrow_filesystem(uri)
    with parquet_errors(uri), fs.open_input_file(path) as fh:
        return int(pq.ParquetFile(fh).metadata.num_rows)


def list_parquet(uri: str, *, threads: int = 16) -> list[FileEntry]:
    """Every ``*.parquet`` file below the folder/prefix ``uri`` with its row count (sorted by
    name; footers read in ``threads`` threads). Raises FileNotFoundError when there is none."""
    from preprocessing.storage import list_files

    files = list_files(uri, suffix=".parquet")
    if not files:
        raise FileNotFoundError(f"{uri}: no Parquet files (run workflows/preprocess.py first)")
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        rows = list(pool.map(_footer_rows, files))
    return [(f, n) for f, n in zip(files, rows, strict=True) if n > 0]


def rows_per_rank(manifest: list[FileEntry], world: int, rank: int = 0) -> int:
    """Rows ``rank`` of ``world`` ranks trains on per epoch: ``total // world``, one more for
    the first ``total % world`` ranks, so that every row is read once per epoch."""
    total = sum(n for _, n in manifest)
    world = max(1, world)
    return total // world + (1 if rank < total % world else 0)


def batches_per_epoch(total_rows: int, *, world: int, batch_size: int) -> int:
    """Steps every rank takes per epoch: the batches of the largest rank's share."""
    largest = -(-int(total_rows) // max(1, world))
    return max(1, -(-largest // max(1, batch_size)))


def equal_batches(batches, *, count: int):
    """``batches`` (dicts of per-column arrays) as exactly ``count`` batches when they are one
    short (a rank with one row fewer than the largest share): the last batch is split in two.
    A last batch of one row cannot be split: it is given twice (only with batch size 1)."""
    produced, last = 0, None
    for batch in batches:
        if last is not None:
            yield last
            produced += 1
        last = batch
    if last is None:
        return
    if produced + 1 >= count:
        yield last
        return
    n = len(next(iter(last.values())))
    cut = (n + 1) // 2
    if n < 2:
        yield last
        yield last
        return
    yield {k: v[:cut] for k, v in last.items()}
    yield {k: v[cut:] for k, v in last.items()}


def epoch_file_order(manifest: list[FileEntry], *, epoch: int, seed: int) -> list[FileEntry]:
    """The files in this epoch's order: a permutation seeded by ``(seed, epoch)``."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)])
    return [manifest[i] for i in rng.permutation(len(manifest))]


def epoch_slices(
    manifest: list[FileEntry], *, epoch: int, seed: int, rank: int, world: int
) -> list[FileSlice]:
    """This rank's file slices for this epoch: rows ``[rank * n, (rank + 1) * n)`` of the
    epoch's file order laid end to end, ``n = rows_per_rank``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    total = sum(n for _, n in manifest)
    lo = rank * (total // world) + min(rank, total % world)
    hi = lo + rows_per_rank(manifest, world, rank)
    out: list[FileSlice] = []
    offset = 0
    for uri, n in epoch_file_order(manifest, epoch=epoch, seed=seed):
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            out.append((uri, a - offset, b - offset))
        offset += n
        if offset >= hi:
            break
    return out


def read_slice(uri: str, start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` of the Parquet file ``uri`` as a pyarrow table."""
    import pyarrow.parquet as pq

    from preprocessing.storage import pyarrow_filesystem

    fs, path = pyarrow_filesystem(uri)
    with parquet_errors(uri):
        table = pq.read_table(path, filesystem=fs)
    if stop > table.num_rows:
        raise ValueError(f"{uri}: has {table.num_rows} rows, expected at least {stop}")
    return table.slice(start, stop - start)


def read_slices(batch: Any) -> Any:
    """Ray Data UDF: a pyarrow batch of ``uri``/``start``/``stop`` rows -> those Parquet rows."""
    import pyarrow as pa

    return pa.concat_tables(
        [
            read_slice(uri, start, stop)
            for uri, start, stop in zip(
                batch.column("uri").to_pylist(),
                batch.column("start").to_pylist(),
                batch.column("stop").to_pylist(),
                strict=True,
            )
        ]
    )


_END = object()


def thread_rows(slices: list[FileSlice], *, prefetch: int) -> Iterator[dict[str, Any]]:
    """The rows of ``slices`` in order, read by a background thread at most ``prefetch`` slices
    ahead (memory stays bounded whatever the dataset size). A read error is raised here, in the
    consumer, naming the file. Closing the generator stops the thread."""
    out: queue.Queue = queue.Queue(maxsize=max(1, int(prefetch)))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for uri, a, b in slices:
                if not put(read_slice(uri, a, b)):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    reader = threading.Thread(target=read, name="pose2seg-train-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item.to_pylist()
    finally:
        stop.set()


def preserve_order() -> None:
    """Make this process's Ray Data executions keep block order (a Train worker calls it): the
    batch sequence then depends on the seed alone, not on which read task finished first."""
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True


def whole_split_dataset(uri: str, *, read_cpus: float, concurrency: int, runtime_env=None):
    """Every row of the Parquet below ``uri`` as a lazy dataset (e.g. the val split), read
    without Ray Data's per-execution listing."""
    files = list_parquet(uri)
    return epoch_dataset(
        [(u, 0, n) for u, n in files],
        read_cpus=read_cpus,
        concurrency=concurrency,
        runtime_env=runtime_env,
    )


def epoch_dataset(
    slices: list[FileSlice],
    *,
    read_cpus: float,
    concurrency: int,
    runtime_env: dict[str, Any] | None = None,
):
    """A lazy ``ray.data.Dataset`` of the rows of ``slices``: one read task per slice, at most
    ``concurrency`` of them at once, each asking for ``read_cpus`` CPUs. Rows come in slice
    order only where the process's ``DataContext`` preserves order (:func:`preserve_order`)."""
    import ray
    from ray.data import TaskPoolStrategy

    if not slices:
        raise ValueError("no rows to read (fewer rows than training workers?)")
    items = [{"uri": u, "start": int(a), "stop": int(b)} for u, a, b in slices]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(
        read_slices,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=read_cpus,
        compute=TaskPoolStrategy(size=max(1, min(int(concurrency), len(items)))),
        **({"runtime_env": runtime_env} if runtime_env else {}),
    )


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Row dicts -> a batch dict of object arrays (values kept as they are)."""
    out: dict[str, np.ndarray] = {}
    for key in rows[0]:
        col = np.empty(len(rows), dtype=object)
        for i, row in enumerate(rows):
            col[i] = row[key]
        out[key] = col
    return out


def shuffled_batches(rows, *, rng: np.random.Generator, buffer_size: int, batch_size: int):
    """Batches (dicts of per-column object arrays) of ``rows`` through a local shuffle buffer
    of ``buffer_size`` rows (``<= 1``: no shuffle). The output depends only on the row sequence
    and ``rng``, not on how the rows were blocked upstream."""
    buf: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for row in rows:
        if buffer_size <= 1:
            out.append(row)
        else:
            buf.append(row)
            if len(buf) >= buffer_size:
                i = int(rng.integers(len(buf)))
                buf[i], buf[-1] = buf[-1], buf[i]
                out.append(buf.pop())
        if len(out) == batch_size:
            yield _columns(out)
            out = []
    for i in rng.permutation(len(buf)):
        out.append(buf[int(i)])
        if len(out) == batch_size:
            yield _columns(out)
            out = []
    if out:
        yield _columns(out)


READERS = ("thread", "ray_data")


class RankStream:
    """One Train worker's training rows for the rest of the run: the slices of every remaining
    epoch laid end to end (each epoch its own seeded file order), read as ONE stream and cut
    back into epochs of exactly :func:`rows_per_rank` rows, each cut into
    :func:`batches_per_epoch` batches. ``reader``: ``thread`` (a
    background thread of this process, :func:`thread_rows`) or ``ray_data`` (one Ray Data
    execution per run: its read tasks' worker processes stay leased across epochs, no pipeline
    start-up between epochs). Both give the same rows in the same order. Call :meth:`epoch` for
    each epoch in order, consuming each fully."""

    def __init__(
        self,
        manifest: list[FileEntry],
        *,
        seed: int,
        first_epoch: int,
        epochs: int,
        rank: int,
        world: int,
        read_cpus: float,
        concurrency: int,
        runtime_env: dict[str, Any] | None = None,
        reader: str = "thread",
    ):
        if reader not in READERS:
            raise ValueError(f"train.input_reader must be one of {READERS}, got {reader!r}")
        self.seed, self.rank, self.world = seed, rank, world
        self.per_rank = rows_per_rank(manifest, world, rank)
        self.total_rows = sum(n for _, n in manifest)
        self.next_epoch = first_epoch
        slices: list[FileSlice] = []
        for epoch in range(first_epoch, epochs):
            slices.extend(epoch_slices(manifest, epoch=epoch, seed=seed, rank=rank, world=world))
        if not slices:
            self._rows: Iterator[dict[str, Any]] = iter(())
        elif reader == "thread":
            self._rows = thread_rows(slices, prefetch=max(2, int(concurrency)))
        else:
            self._rows = self._iter_rows(
                epoch_dataset(
                    slices, read_cpus=read_cpus, concurrency=concurrency, runtime_env=runtime_env
                )
            )

    @staticmethod
    def _iter_rows(ds):
        for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
            keys = list(block)
            for i in range(len(block[keys[0]]) if keys else 0):
                yield {k: block[k][i] for k in keys}

    def epoch(self, epoch: int, *, batch_size: int, buffer_size: int):
        """This epoch's batches: its rows through a shuffle buffer seeded by
        ``(seed, epoch, rank)``."""
        import itertools

        if epoch != self.next_epoch:
            raise ValueError(
                f"epochs must be read in order: expected {self.next_epoch}, got {epoch}"
            )
        self.next_epoch += 1
        rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, int(epoch), int(self.rank)])
        rows = itertools.islice(self._rows, self.per_rank)
        yield from equal_batches(
            shuffled_batches(
                rows, rng=rng, buffer_size=min(buffer_size, self.per_rank), batch_size=batch_size
            ),
            count=batches_per_epoch(self.total_rows, world=self.world, batch_size=batch_size),
        )
