"""The Ray Data preprocessing pipeline: raw COCO-format dataset -> Parquet variant (the only Ray
code of ``preprocessing``).

For a :class:`~pose2seg.config.Config` the variant lives at
``<data.processed>/<config.preprocess_key()>/`` (local or ``s3://``)::

    templates.npy          (T, K, 2) float32 pose templates, fitted once on the train split
    train/*.parquet        one row per image, columns of preprocessing.schema.SCHEMA
    val/*.parquet
    rejects/<split>-<shard>.parquet   rejected people/images, preprocessing.schema.REJECTS_SCHEMA
    meta.json              counts, bytes per person, channel layout, the config; written LAST

``meta.json`` marks a complete variant: a re-run finds it and skips the work unless ``force``.
Re-running is idempotent: the Parquet of a split is written with ``mode="overwrite"`` and each
shard's rejects file has a deterministic name (a retried task rewrites the same file).

The per-image maths (resize, align, render, warp targets) is :mod:`preprocessing.image_processing`;
this module holds the paths, the Ray task and the driver. Work split: the driver fits the templates from the train JSON (keypoints only, no pixels) and
cuts each split's image ids into shards of ``data.images_per_shard``; each shard is one Ray Data
task that reads its images (``preprocessing.coco.CocoPersonDataset``), resizes them into the
input frame, assigns templates, renders skeleton features, warps targets and returns Arrow rows;
``write_parquet`` writes them in the same task. The task writes its rejects file itself (a
second output of the same pass, so no image is read twice). The summary is then computed from
what is stored (Parquet footers and small columns), so it also checks the variant is complete.

People with no usable keypoint cannot be aligned: they are rejected with reason
``no_keypoints`` (expected, not counted against ``data.max_reject_fraction``) and become
ignore regions of their image, like crowds.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pose2seg.checkpoint import TEMPLATES_FILE
from pose2seg.config import Config
from pose2seg.skeleton import NUM_SKELETON_CHANNELS
from pose2seg.templates import (
    fit_pose_templates,
    mirror_templates,
    templates_from_json,
    templates_include_mirrors,
)
from preprocessing import schema
from preprocessing.image_processing import ShardSettings, process_image, reject_record
from preprocessing.storage import (
    exists,
    is_remote,
    join,
    pyarrow_filesystem,
    read_bytes,
    write_bytes,
)

SPLITS: tuple[str, ...] = ("train", "val")
META_FILE = "meta.json"
REJECTS_DIR = "rejects"
TEMPLATE_SEED = 0
"""k-means seed of the templates: a constant, so the templates are a function of the variant key."""
EXPECTED_REJECT_REASONS: frozenset[str] = frozenset({schema.REASON_NO_KEYPOINTS})
"""Reasons that do not count against ``data.max_reject_fraction``."""
REASON_PROCESSING_ERROR = "processing_error"
PARQUET_COMPRESSION = "zstd"
# Variables forwarded to the Ray tasks so that workers started before they were set (or on
# other nodes) reach the same S3 endpoint as the driver. Never credentials: Ray writes a task's
# runtime_env into its logs (runtime_env_agent.log, ray-data/*.log); every node gets them from
# its own environment or the cloud role.
_FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


class PreprocessError(RuntimeError):
    """Preprocessing failed: too many rejected records, or an incomplete/duplicated output."""


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def _absolute(uri: str) -> str:
    """Local paths made absolute on the driver (Ray workers may run in another directory)."""
    return uri if is_remote(uri) else os.path.abspath(uri)


def variant_dir(config: Config) -> str:
    """``<data.processed>/<preprocess_key>``: the folder/prefix of this config's variant."""
    return _absolute(join(config.data.processed, config.preprocess_key()))


def processed_dir(config: Config, split: str) -> str:
    """The Parquet folder/prefix of one split of this config's variant."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return join(variant_dir(config), split)


def raw_paths(config: Config, split: str) -> tuple[str, str]:
    """``(annotations_uri, images_uri)`` of a raw split (``data.<split>_annotations/_images``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    annotations = getattr(config.data, f"{split}_annotations")
    images = getattr(config.data, f"{split}_images")
    root = config.data.root
    return _absolute(join(root, annotations)), _absolute(join(root, images))


def _runtime_env() -> dict[str, Any] | None:
    env = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
    return {"env_vars": env} if env else None


# --------------------------------------------------------------------------------------------
# Per-image processing (pure: no I/O, no Ray)
# --------------------------------------------------------------------------------------------


def _as_reject_dict(rejection: Any) -> dict[str, Any]:
    if isinstance(rejection, dict):
        return rejection
    return {name: getattr(rejection, name) for name in schema.REJECTS_SCHEMA.names}


def _write_table(table: Any, uri: str) -> None:
    import pyarrow.parquet as pq

    fs, path = pyarrow_filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs, compression=PARQUET_COMPRESSION)


def process_shard(
    batch: Any,
    *,
    annotations_uri: str,
    images_uri: str,
    templates: np.ndarray,
    settings: ShardSettings,
    rejects_dir: str,
) -> Any:
    """Ray Data UDF: a batch of shard items ``{"shard": int, "image_ids": list}`` (pyarrow) ->
    the shard's image rows (a pyarrow Table of ``schema.SCHEMA``). Writes the shard's rejects
    to ``rejects_dir/<split>-<shard>.parquet`` (always, even when empty)."""
    from preprocessing.coco import CocoPersonDataset

    rows: list[dict[str, Any]] = []
    for item in batch.to_pylist():
        rejects: list[dict[str, Any]] = []
        # The shard's own images and annotations, shipped by the driver: workers never parse
        # the whole annotation file.
        reader = CocoPersonDataset(
            annotations_uri,
            images_uri,
            split=settings.split,
            data=json.loads(item["coco_json"]),
            keypoint_margin_fraction=settings.keypoint_margin_fraction,
        )
        for image_id in item["image_ids"]:
            record, reader_rejects = reader.read(int(image_id))
            rejects.extend(_as_reject_dict(r) for r in reader_rejects)
            if record is None:
                continue
            try:
                row, image_rejects = process_image(record, templates, settings)
            except Exception as exc:  # recorded, never dropped: counts against the reject limit
                rejects.append(
                    reject_record(
                        settings.split,
                        record,
                        None,
                        REASON_PROCESSING_ERROR,
                        f"{type(exc).__name__}: {exc}",
                    )
                )
                continue
            rejects.extend(image_rejects)
            if row is not None:
                rows.append(row)
        name = f"{settings.split}-{int(item['shard']):05d}.parquet"
        table = schema.rejects_to_table(rejects)
        # Which node built the shard, in the rejects file's metadata (the rows stay the same
        # wherever a shard ran): the summary counts shards per node.
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), NODE_ID_METADATA: _node_id().encode()}
        )
        _write_table(table, join(rejects_dir, name))
    return schema.rows_to_table(rows)


NODE_ID_METADATA = b"pose2seg.node_id"


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def _shard_nodes(rejects_dir: str, split: str) -> dict[str, int]:
    """Shards of ``split`` per Ray node id, read from the shards' rejects files."""
    import pyarrow.parquet as pq

    fs, files = _parquet_files(rejects_dir)
    nodes: Counter[str] = Counter()
    for path in files:
        base = path.rsplit("/", 1)[-1]
        if base.startswith(f"{split}-") and base[len(split) + 1 : -len(".parquet")].isdigit():
            with fs.open_input_file(path) as fh:
                meta = pq.ParquetFile(fh).schema_arrow.metadata or {}
            nodes[meta.get(NODE_ID_METADATA, b"unknown").decode()] += 1
    return dict(sorted(nodes.items()))


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


@dataclass
class SplitSummary:
    """Counts of one preprocessed split, read back from storage."""

    split: str
    images_in: int
    rows_out: int
    people_out: int
    rejected: dict[str, int] = field(default_factory=dict)
    """Rows of the rejects table by reason (one per rejected person or image)."""
    people_rejected: dict[str, int] = field(default_factory=dict)
    """People lost by reason: a rejected image counts the person annotations it held."""
    shards: int = 0
    seconds: float = 0.0
    people_template_none: int = 0
    """Kept people with ``template_id = -1``: the keypoint fallback (pose alignment) or
    everyone (box alignment)."""
    shard_nodes: dict[str, int] = field(default_factory=dict)
    """Shards built per Ray node id (a multi-node cluster spreads them)."""

    @property
    def reject_fraction(self) -> float:
        """People rejected for unexpected reasons over all people (kept + rejected)."""
        total = self.people_out + sum(self.people_rejected.values())
        unexpected = sum(
            v for k, v in self.people_rejected.items() if k not in EXPECTED_REJECT_REASONS
        )
        return unexpected / total if total else 0.0


@dataclass
class PreprocessSummary:
    """What :func:`preprocess_dataset` did (or found, when ``skipped``)."""

    key: str
    uri: str
    splits: dict[str, SplitSummary]
    bytes_per_person: dict[str, float]
    num_templates: int
    skipped: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name, split in self.splits.items():
            out["splits"][name]["reject_fraction"] = split.reject_fraction
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSummary:
        splits = {}
        for name, s in data["splits"].items():
            s = {k: v for k, v in s.items() if k != "reject_fraction"}
            splits[name] = SplitSummary(**s)
        return cls(
            key=data["key"],
            uri=data["uri"],
            splits=splits,
            bytes_per_person=dict(data.get("bytes_per_person", {})),
            num_templates=int(data.get("num_templates", 0)),
            skipped=bool(data.get("skipped", False)),
            seconds=float(data.get("seconds", 0.0)),
        )

    def format(self) -> str:
        """A human-readable report: images in, rows out, people out, rejects by reason."""
        head = "already complete, skipped" if self.skipped else f"done in {self.seconds:.1f} s"
        lines = [f"preprocess variant {self.key} at {self.uri}: {head}"]
        for s in self.splits.values():
            people = ", ".join(f"{k}={v}" for k, v in s.people_rejected.items()) or "none"
            records = ", ".join(f"{k}={v}" for k, v in s.rejected.items()) or "none"
            lines.append(
                f"  {s.split}: images in {s.images_in}, rows out {s.rows_out}, people out "
                f"{s.people_out}, people rejected by reason: {people} (reject records: "
                f"{records}; counted fraction {s.reject_fraction:.3f})"
            )
        if self.bytes_per_person:
            b = self.bytes_per_person
            lines.append(
                f"  bytes per person (Parquet, compressed): skeleton {b.get('skeleton', 0):.0f}, "
                f"targets {b.get('targets', 0):.0f}, total {b.get('total', 0):.0f} "
                f"(raw {b.get('raw', 0):.0f})"
            )
        return "\n".join(lines)


def _read_json(uri: str) -> dict[str, Any] | None:
    if not exists(uri):
        return None
    return json.loads(read_bytes(uri).decode("utf-8"))


def _train_keypoints(annotations_uri: str, train_reader: Any) -> np.ndarray:
    """``(N, K, 3)`` keypoints of the train people the shard pass will keep (the reader's one
    keypoint validation: a malformed person or one with keypoints far outside its image is a
    counted reject there, and never reaches the templates) with >= 3 labelled keypoints."""
    people = [kp for kp in train_reader.valid_keypoints() if (kp[:, 2] > 0).sum() >= 3]
    if not people:
        raise PreprocessError(
            f"{annotations_uri}: no person with >= 3 valid labelled keypoints to fit templates on "
            "(see the rejects table for the people that were rejected)"
        )
    return np.stack(people).astype(np.float64)


def load_templates(config: Config) -> np.ndarray:
    """The (T, K, 2) float32 pose templates stored with the config's preprocessed variant."""
    return np.load(io.BytesIO(read_bytes(join(variant_dir(config), TEMPLATES_FILE)))).astype(
        np.float32
    )


def ensure_templates(config: Config, train_reader: Any, *, force: bool = False) -> np.ndarray:
    """Fit the pose templates on the keypoints of ``train_reader`` (the parsed train split)
    once (``templates.npy``)."""
    uri = join(variant_dir(config), TEMPLATES_FILE)
    if not force and exists(uri):
        return load_templates(config)
    annotations_uri, _ = raw_paths(config, "train")
    keypoints = _train_keypoints(annotations_uri, train_reader)
    templates = _build_templates(config, keypoints)
    buffer = io.BytesIO()
    np.save(buffer, templates)
    write_bytes(uri, buffer.getvalue())
    print(
        f"preprocess: fitted {len(templates)} pose templates on {len(keypoints)} train poses -> {uri}"
    )
    return templates


def _build_templates(config: Config, keypoints: np.ndarray) -> np.ndarray:
    """The templates of ``config``: read from ``model.templates_file`` (the official
    ``templates.json`` layout) or fitted on the train ``keypoints``; mirrors added if asked."""
    model = config.model
    if model.templates_file:
        source = model.templates_file
        try:
            data = json.loads(read_bytes(source).decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"model.templates_file: cannot read {source!r} as JSON: {exc}"
            ) from exc
        templates = templates_from_json(
            data, source=f"model.templates_file {source!r}", scale=model.template_scale
        )
        # A file that already lists its mirrored copies (configs/official_templates.json) keeps
        # the official search order as it is.
        if model.mirror_templates and not templates_include_mirrors(data):
            return mirror_templates(templates)
        return templates
    return fit_pose_templates(
        keypoints,
        num_templates=model.num_templates,
        seed=TEMPLATE_SEED,
        shape=model.template_shape,
        mirror=model.mirror_templates,
    )


def _delete_split_rejects(rejects_dir: str, split: str) -> None:
    from pyarrow import fs as pafs

    fs, path = pyarrow_filesystem(rejects_dir)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except FileNotFoundError:
        return
    for info in infos:
        if info.type == pafs.FileType.File and info.base_name.startswith(f"{split}-"):
            fs.delete_file(info.path)


def _parquet_files(uri: str) -> tuple[Any, list[str]]:
    from pyarrow import fs as pafs

    fs, path = pyarrow_filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    return fs, sorted(
        i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    )


def _stored_split_stats(uri: str) -> dict[str, Any]:
    """Image ids, people and compressed column bytes of a stored split (footers + 2 columns)."""
    import pyarrow.parquet as pq

    fs, files = _parquet_files(uri)
    image_ids: list[int] = []
    people = template_none = 0
    column_bytes: Counter[str] = Counter()
    for path in files:
        with fs.open_input_file(path) as fh:
            parquet = pq.ParquetFile(fh)
            meta = parquet.metadata
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                for c in range(group.num_columns):
                    column = group.column(c)
                    column_bytes[column.path_in_schema] += column.total_compressed_size
            table = parquet.read(columns=[schema.IMAGE_ID, schema.NUM_PEOPLE, schema.TEMPLATE_IDS])
        image_ids.extend(table.column(schema.IMAGE_ID).to_pylist())
        people += int(sum(table.column(schema.NUM_PEOPLE).to_pylist()))
        template_none += sum(
            t == -1 for ids in table.column(schema.TEMPLATE_IDS).to_pylist() for t in ids or []
        )
    return {
        "files": len(files),
        "image_ids": image_ids,
        "people": people,
        "template_none": int(template_none),
        "column_bytes": column_bytes,
    }


def _stored_rejects(rejects_dir: str, split: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    fs, files = _parquet_files(rejects_dir)
    out: list[dict[str, Any]] = []
    for path in files:
        if path.rsplit("/", 1)[-1].startswith(f"{split}-"):
            with fs.open_input_file(path) as fh:
                out.extend(pq.read_table(fh).to_pylist())
    return out


def _split_reader(config: Config, split: str) -> Any:
    from preprocessing.coco import CocoPersonDataset

    annotations_uri, images_uri = raw_paths(config, split)
    return CocoPersonDataset(
        annotations_uri,
        images_uri,
        split=split,
        keypoint_margin_fraction=config.data.keypoint_margin_fraction,
    )


def _run_split(
    config: Config,
    split: str,
    templates: np.ndarray,
    *,
    num_cpus_per_task: float,
    reader: Any = None,
) -> tuple[SplitSummary, Counter[str]]:
    """Build one split; returns its summary and the compressed bytes per Parquet column.
    ``reader``: the split already parsed (else it is parsed here)."""
    import ray

    start = time.perf_counter()
    annotations_uri, images_uri = raw_paths(config, split)
    if reader is None:
        reader = _split_reader(config, split)
    image_ids = [int(i) for i in reader.image_ids]
    per_shard = config.data.images_per_shard
    # Each shard carries its own images' annotations: the annotation file is parsed once, on
    # the driver, not again in every worker process (a COCO-size JSON is hundreds of MB).
    items = [
        {
            "shard": s,
            "image_ids": image_ids[i : i + per_shard],
            "coco_json": reader.subset_json(image_ids[i : i + per_shard]),
        }
        for s, i in enumerate(range(0, len(image_ids), per_shard))
    ]
    out_uri = processed_dir(config, split)
    rejects_dir = join(variant_dir(config), REJECTS_DIR)
    print(
        f"preprocess[{split}]: {len(image_ids)} images in {len(items)} shards of <= {per_shard} "
        f"({num_cpus_per_task} CPU each) -> {out_uri}",
        flush=True,
    )
    _delete_split_rejects(rejects_dir, split)
    # Annotations naming no known image belong to no shard: the driver records them.
    _write_table(
        schema.rejects_to_table(
            [_as_reject_dict(r) for r in getattr(reader, "dataset_rejections", [])]
        ),
        join(rejects_dir, f"{split}-dataset.parquet"),
    )
    runtime_env = _runtime_env()
    fs, path = pyarrow_filesystem(out_uri)
    if items:
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            process_shard,
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=num_cpus_per_task,
            runtime_env=runtime_env,
            fn_kwargs={
                "annotations_uri": annotations_uri,
                "images_uri": images_uri,
                "templates": templates,
                "settings": ShardSettings.from_config(config, split),
                "rejects_dir": rejects_dir,
            },
        )
        ds.write_parquet(
            path,
            filesystem=fs,
            mode="overwrite",
            compression=PARQUET_COMPRESSION,
            ray_remote_args={"runtime_env": runtime_env} if runtime_env else None,
        )
    stats = _stored_split_stats(out_uri)
    rejects = _stored_rejects(rejects_dir, split)
    stored_ids = stats["image_ids"]
    if len(stored_ids) != len(set(stored_ids)):
        raise PreprocessError(
            f"{out_uri}: duplicate image rows ({len(stored_ids)} rows, {len(set(stored_ids))} ids)"
        )
    accounted = set(stored_ids) | {r[schema.REJECT_IMAGE_ID] for r in rejects}
    missing = sorted(set(image_ids) - accounted)
    if missing:
        raise PreprocessError(
            f"{out_uri}: {len(missing)} images neither stored nor rejected (e.g. {missing[:5]}); "
            "the run is incomplete, re-run with --force"
        )
    people_rejected: Counter[str] = Counter()
    known_ids = set(image_ids)
    for r in rejects:
        if r[schema.REJECT_ANNOTATION_ID] is not None:
            people_rejected[r[schema.REJECT_REASON]] += 1
        elif r[schema.REJECT_IMAGE_ID] in known_ids:
            people_rejected[r[schema.REJECT_REASON]] += reader.num_people_in(
                r[schema.REJECT_IMAGE_ID]
            )
    summary = SplitSummary(
        split=split,
        images_in=len(image_ids),
        rows_out=len(stored_ids),
        people_out=stats["people"],
        rejected=dict(sorted(Counter(r[schema.REJECT_REASON] for r in rejects).items())),
        people_rejected=dict(sorted(people_rejected.items())),
        shards=len(items),
        seconds=time.perf_counter() - start,
        people_template_none=stats["template_none"],
        shard_nodes=_shard_nodes(rejects_dir, split),
    )
    print(
        f"preprocess[{split}]: images in {summary.images_in}, rows out {summary.rows_out}, people "
        f"out {summary.people_out} ({summary.people_template_none} without a template: "
        f"fallback RoI or box alignment), people rejected {summary.people_rejected or 'none'} in "
        f"{summary.seconds:.1f} s on {len(summary.shard_nodes)} "
        f"node{'s' if len(summary.shard_nodes) != 1 else ''}",
        flush=True,
    )
    return summary, stats["column_bytes"]


def _bytes_per_person(column_bytes: Counter[str], people: int, roi_size: int) -> dict[str, float]:
    if people == 0:
        return {}
    skeleton = column_bytes.get(schema.SKELETON, 0) / people
    targets = column_bytes.get(schema.TARGETS, 0) / people
    raw = NUM_SKELETON_CHANNELS * roi_size * roi_size + roi_size * roi_size / 8
    return {"skeleton": skeleton, "targets": targets, "total": skeleton + targets, "raw": raw}


def preprocess_dataset(
    config: Config,
    *,
    splits: tuple[str, ...] = SPLITS,
    force: bool = False,
    num_cpus_per_task: float = 1.0,
) -> PreprocessSummary:
    """Make sure this config's Parquet variant exists; build it with Ray Data if not.

    Args:
        config: the workflow config (``data.*`` and the ``model.*`` preprocessing keys).
        splits: which splits to (re)build.
        force: rebuild even when ``meta.json`` says the variant is complete.
        num_cpus_per_task: CPUs each shard task asks Ray for.

    Returns:
        The summary (counts per split, bytes per person), also stored in ``meta.json``.

    Raises:
        PreprocessError: the fraction of rejected records (excluding ``no_keypoints``) of a
            split exceeds ``data.max_reject_fraction``, or the output is incomplete.
        ValueError / FileNotFoundError: a bad split name or a missing raw dataset, naming it.
    """
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty subset of {list(SPLITS)}, got {list(splits)}")
    start = time.perf_counter()
    uri = variant_dir(config)
    meta_uri = join(uri, META_FILE)
    meta = _read_json(meta_uri)
    if (
        meta is not None
        and not force
        and all(s in meta.get("summary", {}).get("splits", {}) for s in splits)
    ):
        summary = PreprocessSummary.from_dict(meta["summary"])
        summary.skipped = True
        print(
            f"preprocess: variant {summary.key} at {uri} is complete (meta.json); skipped",
            flush=True,
        )
        return summary

    if config.data.source == "synthetic":
        from preprocessing.synthetic import ensure_synthetic_dataset

        ensure_synthetic_dataset(config)
    for split in set(splits) | {"train"}:
        annotations_uri, _ = raw_paths(config, split)
        if not exists(annotations_uri):
            raise FileNotFoundError(
                f"data.{split}_annotations: {annotations_uri} does not exist (data.root={config.data.root!r})"
            )
    if exists(meta_uri):
        # Mark the variant incomplete until this run finishes.
        if is_remote(meta_uri):
            from preprocessing.storage import s3_call, s3_client, split_s3

            bucket, key = split_s3(meta_uri)
            with s3_call("DeleteObject", meta_uri):
                s3_client().delete_object(Bucket=bucket, Key=key)
        else:
            os.remove(meta_uri)

    train_reader = _split_reader(config, "train")  # parsed once: templates + train shards
    templates = ensure_templates(config, train_reader, force=force)
    results: dict[str, SplitSummary] = {}
    column_bytes: Counter[str] = Counter()
    for split in splits:
        results[split], split_bytes = _run_split(
            config,
            split,
            templates,
            num_cpus_per_task=num_cpus_per_task,
            reader=train_reader if split == "train" else None,
        )
        column_bytes.update(split_bytes)
    # Splits built earlier for this variant and not rebuilt now stay in the summary.
    if meta is not None:
        for name, s in meta.get("summary", {}).get("splits", {}).items():
            if name not in results:
                results[name] = SplitSummary(
                    **{k: v for k, v in s.items() if k != "reject_fraction"}
                )
    people = sum(results[s].people_out for s in splits)
    summary = PreprocessSummary(
        key=config.preprocess_key(),
        uri=uri,
        splits={s: results[s] for s in SPLITS if s in results},
        bytes_per_person=_bytes_per_person(column_bytes, people, config.model.roi_size),
        num_templates=len(templates),
        seconds=time.perf_counter() - start,
    )
    too_many = {
        s.split: s.reject_fraction
        for s in summary.splits.values()
        if s.reject_fraction > config.data.max_reject_fraction
    }
    if too_many:
        detail = ", ".join(
            f"{name}: {frac:.3f} ({summary.splits[name].rejected})"
            for name, frac in too_many.items()
        )
        raise PreprocessError(
            f"rejected fraction above data.max_reject_fraction={config.data.max_reject_fraction}: "
            f"{detail}; see {join(uri, REJECTS_DIR)}"
        )
    meta = {
        "key": summary.key,
        "summary": summary.to_dict(),
        "roi_size": config.model.roi_size,
        "input_size": config.data.input_size,
        "num_templates": len(templates),
        "templates_file": TEMPLATES_FILE,
        "channel_layout": schema.channel_layout(),
        "skeleton_quantisation": "int8, value = round(x * 127), x = value / 127",
        "targets_encoding": "np.packbits of bool (N, S, S)",
        "columns": list(schema.COLUMNS),
        "config": config.to_flat(),
        "created_unix": time.time(),
    }
    write_bytes(meta_uri, json.dumps(meta, indent=2, sort_keys=True, default=str).encode("utf-8"))
    return summary


READ_CPUS: float = 0.25
"""CPUs each Parquet read task of :func:`load_split` asks for."""


def load_split(config: Config, split: str) -> Any:
    """The stored Parquet of one split as a lazy ``ray.data.Dataset`` (local or s3://).

    Raises:
        FileNotFoundError: the variant has not been preprocessed (run workflows/preprocess.py).
    """
    import ray

    uri = processed_dir(config, split)
    if not exists(join(variant_dir(config), META_FILE)):
        raise FileNotFoundError(
            f"{variant_dir(config)}: no complete preprocessed variant (meta.json missing); run "
            "workflows/preprocess.py with the same config first"
        )
    fs, path = pyarrow_filesystem(uri)
    runtime_env = _runtime_env()
    # Reads ask for a quarter CPU: Train workers and Tune trial drivers hold most CPUs of a
    # small cluster, and a read task that waits for a whole free CPU would starve the run.
    return ray.data.read_parquet(
        path,
        filesystem=fs,
        num_cpus=READ_CPUS,
        **({"runtime_env": runtime_env} if runtime_env else {}),
    )
