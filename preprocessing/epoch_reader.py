"""Training input per epoch and per rank: a seeded shuffle of the Parquet files, cut by rows.

The driver lists the training Parquet once per run (:func:`train_manifest`: each file and its
row count, read from the footers). For every epoch, every Train worker computes the same seeded
permutation of the files, lays their rows end to end and takes its own contiguous share of
``total // world`` rows (:func:`epoch_slices`). It streams the shares of all its remaining
epochs as one Ray Data pipeline for the run (:class:`RankStream` over :func:`epoch_dataset`: one
read task per file slice, a fixed number of them in flight, output in a fixed order), cuts it
back into epochs by row count and mixes each epoch in a seeded shuffle buffer
(:func:`shuffled_batches`). So:

- every rank gets the same number of rows (DDP steps stay in lock step), every row is used at
  most once per epoch and at most ``world - 1`` rows are left out per epoch (a different few
  each epoch);
- the file (block) order is different every epoch and the same for the same seed; with the
  worker's seeded local shuffle buffer the whole batch sequence is reproducible;
- nothing is materialised: a rank holds a bounded number of file slices in flight, whatever the
  size of the dataset, and read tasks run anywhere in the cluster;
- no per-epoch file listing and no per-epoch pipeline: Ray Data's own Parquet reader lists and
  footer-reads the folder on every execution (in Ray 2.60 with a pool of actors, each a new
  worker process), and a new pipeline each epoch had Ray start read workers again, so the
  number of Ray worker processes grew with the number of epochs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

FileEntry = tuple[str, int]  # (uri, rows)
FileSlice = tuple[str, int, int]  # (uri, first row, end row)


def _footer_rows(uri: str) -> int:
    import pyarrow.parquet as pq

    from preprocessing.storage import pyarrow_filesystem

    fs, path = pyarrow_filesystem(uri)
    with fs.open_input_file(path) as fh:
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


def rows_per_rank(manifest: list[FileEntry], world: int) -> int:
    """Rows each of ``world`` ranks trains on per epoch (the same for every rank)."""
    return sum(n for _, n in manifest) // max(1, world)


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
    per_rank = rows_per_rank(manifest, world)
    lo, hi = rank * per_rank, (rank + 1) * per_rank
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


def read_slices(batch: Any) -> Any:
    """Ray Data UDF: a pyarrow batch of ``uri``/``start``/``stop`` rows -> those Parquet rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from preprocessing.storage import pyarrow_filesystem

    tables = []
    for uri, start, stop in zip(
        batch.column("uri").to_pylist(),
        batch.column("start").to_pylist(),
        batch.column("stop").to_pylist(),
        strict=True,
    ):
        fs, path = pyarrow_filesystem(uri)
        table = pq.read_table(path, filesystem=fs)
        if stop > table.num_rows:
            raise ValueError(f"{uri}: has {table.num_rows} rows, expected at least {stop}")
        tables.append(table.slice(start, stop - start))
    return pa.concat_tables(tables)


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


class RankStream:
    """One Train worker's training rows for the rest of the run, as ONE Ray Data execution:
    the slices of every remaining epoch laid end to end (each epoch its own seeded file
    order), cut back into epochs of exactly :func:`rows_per_rank` rows. One execution per run
    instead of one per epoch: the read tasks' worker processes stay leased across epochs, and
    no pipeline start-up between epochs. Call :meth:`epoch` for each epoch in order, consuming
    each fully."""

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
    ):
        self.seed, self.rank, self.world = seed, rank, world
        self.per_rank = rows_per_rank(manifest, world)
        self.next_epoch = first_epoch
        slices: list[FileSlice] = []
        for epoch in range(first_epoch, epochs):
            slices.extend(epoch_slices(manifest, epoch=epoch, seed=seed, rank=rank, world=world))
        self._rows = self._iter_rows(
            epoch_dataset(
                slices, read_cpus=read_cpus, concurrency=concurrency, runtime_env=runtime_env
            )
            if slices
            else None
        )

    @staticmethod
    def _iter_rows(ds):
        if ds is None:
            return
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
        yield from shuffled_batches(
            rows, rng=rng, buffer_size=min(buffer_size, self.per_rank), batch_size=batch_size
        )
