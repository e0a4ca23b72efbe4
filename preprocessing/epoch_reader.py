"""Training input per epoch and per rank: a seeded shuffle of the Parquet files, cut by rows.

The driver lists the training Parquet once per run (:func:`train_manifest`: each file and its
row count, read from the footers). For every epoch, every Train worker computes the same seeded
permutation of the files, lays their rows end to end and takes its own contiguous share of
``total // world`` rows (:func:`epoch_slices`). It streams that share with a small Ray Data
pipeline (:func:`epoch_dataset`): one read task per file slice, a fixed number of them in flight,
output in a fixed order. So:

- every rank gets the same number of rows (DDP steps stay in lock step), every row is used at
  most once per epoch and at most ``world - 1`` rows are left out per epoch (a different few
  each epoch);
- the file (block) order is different every epoch and the same for the same seed; with the
  worker's seeded local shuffle buffer the whole batch sequence is reproducible;
- nothing is materialised: a rank holds a bounded number of file slices in flight, whatever the
  size of the dataset, and read tasks run anywhere in the cluster;
- no per-epoch file listing: Ray Data's own Parquet reader lists and footer-reads the folder on
  every execution (in Ray 2.60 with a pool of actors, each a new worker process), which made the
  number of Ray worker processes grow with the number of epochs.
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
