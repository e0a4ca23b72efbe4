"""Datasets on a real S3-compatible server (moto_server on loopback) through storage and the reader."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pose2seg.config import Config
from preprocessing import storage
from preprocessing.coco import CocoPersonDataset
from preprocessing.synthetic import META_FILE, ensure_synthetic_dataset, generate_synthetic_dataset

pytestmark = pytest.mark.integration

PARAMS = {
    "num_train": 3,
    "num_val": 4,
    "image_size": 96,
    "max_people": 3,
    "overlap": 0.7,
    "seed": 5,
}


def _people(dataset: CocoPersonDataset) -> dict[int, list[tuple[int, np.ndarray, np.ndarray]]]:
    out = {}
    for record, rejections in dataset.iter_records():
        assert record is not None and rejections == []
        out[record.image_id] = [(p.annotation_id, p.keypoints, p.mask) for p in record.people]
    return out


def test_storage_round_trip_on_s3(s3_bucket, tmp_path):
    base = f"s3://{s3_bucket}/some/prefix"
    assert not storage.exists(base)
    storage.write_bytes(storage.join(base, "a.txt"), b"A")
    storage.write_bytes(storage.join(base, "deep/b.json"), b"{}")
    assert storage.exists(base) and storage.exists(f"{base}/a.txt")
    assert not storage.exists(f"{base}/absent.txt")
    assert storage.read_bytes(f"{base}/a.txt") == b"A"
    assert storage.list_files(base) == [f"{base}/a.txt", f"{base}/deep/b.json"]
    assert storage.list_files(base, suffix=".json") == [f"{base}/deep/b.json"]
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        storage.read_bytes(f"{base}/absent.txt")
    assert storage.download_dir(base, str(tmp_path / "down")) == 2
    assert (tmp_path / "down" / "deep" / "b.json").read_bytes() == b"{}"


def test_pyarrow_filesystem_reaches_the_endpoint(s3_bucket):
    fs, path = storage.pyarrow_filesystem(f"s3://{s3_bucket}/parquet/x.parquet")
    pq.write_table(pa.table({"v": [1, 2, 3]}), path, filesystem=fs)
    assert storage.exists(f"s3://{s3_bucket}/parquet/x.parquet")
    assert pq.read_table(path, filesystem=fs)["v"].to_pylist() == [1, 2, 3]


def test_generated_dataset_on_s3_reads_like_the_local_one(s3_bucket, tmp_path):
    root = f"s3://{s3_bucket}/synthetic"
    summary = generate_synthetic_dataset(root, **PARAMS)
    generate_synthetic_dataset(str(tmp_path), **PARAMS)
    assert storage.exists(storage.join(root, META_FILE))
    for split in ("train", "val"):
        remote = CocoPersonDataset(
            storage.join(root, f"annotations/person_keypoints_{split}.json"),
            storage.join(root, f"images/{split}"),
            split=split,
        )
        local = CocoPersonDataset(
            str(tmp_path / "annotations" / f"person_keypoints_{split}.json"),
            str(tmp_path / "images" / split),
            split=split,
        )
        assert remote.num_people == summary["splits"][split]["people"] > 0
        got, want = _people(remote), _people(local)
        assert got.keys() == want.keys()
        for image_id in want:
            for (ga, gk, gm), (wa, wk, wm) in zip(got[image_id], want[image_id], strict=True):
                assert ga == wa and np.array_equal(gk, wk) and np.array_equal(gm, wm)


def test_coco_sample_uploaded_to_s3(s3_bucket, coco_sample_dir):
    root = f"s3://{s3_bucket}/coco"
    assert storage.upload_dir(str(coco_sample_dir), root) >= 5
    dataset = CocoPersonDataset(f"{root}/person_keypoints_sample.json", root, split="val")
    people = [p for record, _ in dataset.iter_records() for p in record.people]
    assert len(dataset.image_ids) == 4 and len(people) == 14
    assert sum(p.num_keypoints == 0 for p in people) == 2


def test_missing_image_on_s3_is_rejected(s3_bucket, coco_sample_dir):
    root = f"s3://{s3_bucket}/partial"
    storage.write_bytes(
        f"{root}/ann.json", (coco_sample_dir / "person_keypoints_sample.json").read_bytes()
    )
    storage.write_bytes(
        f"{root}/000000000785.jpg", (coco_sample_dir / "000000000785.jpg").read_bytes()
    )
    dataset = CocoPersonDataset(f"{root}/ann.json", root, split="val")
    record, rejections = dataset.read(785)
    assert record is not None and len(record.people) == 1
    record, (rejection,) = dataset.read(40083)
    assert record is None and rejection.reason == "image_missing"
    assert f"{root}/000000040083.jpg" in rejection.detail and rejection.detail.endswith("people=3")


def test_ensure_synthetic_dataset_on_s3(s3_bucket):
    root = f"s3://{s3_bucket}/ensured"
    config = Config().with_overrides(
        {
            "data.root": root,
            "data.synthetic_num_train": 2,
            "data.synthetic_num_val": 2,
            "data.synthetic_image_size": 64,
        }
    )
    assert ensure_synthetic_dataset(config) == root
    meta = json.loads(storage.read_bytes(f"{root}/{META_FILE}"))
    assert meta["params"]["num_train"] == 2
    images = storage.list_files(f"{root}/images/train", suffix=".png")
    assert len(images) == 2
    storage.write_bytes(images[0], b"marker")  # a regeneration would overwrite it
    ensure_synthetic_dataset(config)
    assert storage.read_bytes(images[0]) == b"marker"


def test_folder_markers_are_not_files_and_an_s3_checkpoint_folder_gives_init_weights(
    s3_bucket, tmp_path
):
    """Ray Train uploads checkpoint folders through pyarrow, which also stores each folder as an
    empty ``<folder>/`` object: listing and downloading skip such markers (downloading one
    failed with "Not a directory" and made every ``train.init_weights`` on S3 unreadable)."""
    import torch

    from pose2seg.arch import build_model
    from pose2seg.checkpoint import save_checkpoint
    from tests.helpers import tiny_config
    from workflows.train_input import init_weights_state

    config = tiny_config(tmp_path)
    local = tmp_path / "ckpt"
    torch.manual_seed(0)
    model = build_model(config.model, input_size=config.data.input_size)
    save_checkpoint(
        str(local), model=model, config=config, templates=np.zeros((2, 17, 3), np.float32)
    )
    fs, root = storage.pyarrow_filesystem(f"s3://{s3_bucket}/runs/r1/checkpoint_1")
    fs.create_dir(root)  # the marker objects: runs/, runs/r1/, runs/r1/checkpoint_1/
    for path in sorted(local.rglob("*")):
        if path.is_file():
            rel = path.relative_to(local).as_posix()
            storage.write_bytes(f"s3://{s3_bucket}/runs/r1/checkpoint_1/{rel}", path.read_bytes())
    uri = f"s3://{s3_bucket}/runs/r1/checkpoint_1"
    files = storage.list_files(uri)
    assert files and not any(f.endswith("/") for f in files), files
    assert storage.download_dir(uri, str(tmp_path / "down")) == len(files)
    state = init_weights_state(config.with_overrides({"train.init_weights": uri}))
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key


def _upload_folder(local, uri: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes(f"{uri}/{path.relative_to(local).as_posix()}", path.read_bytes())


def test_a_worker_restores_from_its_own_copy_not_a_half_written_shared_folder(s3_bucket, tmp_path):
    """A worker restoring from a checkpoint on S3 downloads its own copy. Ray's
    ``Checkpoint.as_directory`` shares one temporary folder per machine, and a process that
    waited for another's download gets that folder as the download left it: here the
    downloader "died" half-way (a truncated ``training.pt``, its lock released), the situation
    of a worker group restarted while one of its workers was still downloading."""
    import shutil
    import threading
    import time
    from pathlib import Path

    import torch
    from ray.air._internal.filelock import TempFileLock
    from ray.train import Checkpoint

    from pose2seg.checkpoint import MODEL_FILE, TRAINING_FILE
    from tests.helpers import tiny_config
    from workflows.train_worker import TrainState

    config = tiny_config(tmp_path)
    torch.manual_seed(0)
    saved = TrainState.build(config, total_steps=10, amp_dtype=None)
    saved.epoch, saved.step = 3, 12
    local = tmp_path / "ckpt"
    saved.save(str(local), config=config, templates=np.zeros((2, 17, 3), np.float32), metrics={})
    uri = f"s3://{s3_bucket}/runs/r1/checkpoint_3"
    _upload_folder(local, uri)
    fs, root = storage.pyarrow_filesystem(uri)
    checkpoint = Checkpoint(root, filesystem=fs)
    shared = Path(checkpoint._get_temporary_checkpoint_dir())

    def died_half_way() -> None:
        shared.mkdir(parents=True, exist_ok=True)
        for name in (MODEL_FILE, TRAINING_FILE):
            whole = (local / name).read_bytes()
            (shared / name).write_bytes(whole[: len(whole) // 2])
        held = threading.Event()

        def downloader() -> None:  # holds the folder's lock, then dies
            with TempFileLock(str(shared), timeout=0):
                held.set()
                time.sleep(0.5)

        threading.Thread(target=downloader, daemon=True).start()
        assert held.wait(10)

    half = len((local / TRAINING_FILE).read_bytes()) // 2
    try:
        # The hazard is real: waiting for the "downloader", as_directory gives its half folder.
        died_half_way()
        with checkpoint.as_directory() as folder:
            assert len((Path(folder) / TRAINING_FILE).read_bytes()) == half
        died_half_way()
        torch.manual_seed(1)
        restored = TrainState.build(config, total_steps=10, amp_dtype=None)
        restored.restore_from(checkpoint)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert (restored.epoch, restored.step) == (3, 12)
    for key, value in saved.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[key], value), key
    assert restored.optimizer.state_dict() == saved.optimizer.state_dict()


def test_committed_checkpoints_and_the_final_history_are_read_from_s3(s3_bucket):
    """What the multi-node test and demo read of a run on S3: the checkpoints its controller
    registered, per run folder (an uploaded, unregistered one is not among them), and the
    history of the newest stored checkpoint (by epoch, not by the listing's order)."""
    from workflows.local_cluster import committed_checkpoints, final_history

    base = f"s3://{s3_bucket}/runs"
    for epoch in (2, 10, 9):  # "checkpoint_10" lists before "checkpoint_9"
        history = [{"epoch": e, "world_size": 1 + (e > 5)} for e in range(1, epoch + 1)]
        state = {"epoch": epoch, "history": history}
        storage.write_bytes(f"{base}/r1/checkpoint_{epoch}/state.json", json.dumps(state).encode())
    snapshot = {"checkpoint_results": [{"metrics": {"epoch": 2}}, {"metrics": {"epoch": 9}}]}
    storage.write_bytes(
        f"{base}/r1/checkpoint_manager_snapshot.json", json.dumps(snapshot).encode()
    )
    storage.write_bytes(f"{base}/r1/notes/state.json", json.dumps({"epoch": 99}).encode())

    assert committed_checkpoints(s3_bucket, "runs/") == {"runs/r1": [{"epoch": 2}, {"epoch": 9}]}
    assert committed_checkpoints(s3_bucket, "other/") == {}
    assert [h["epoch"] for h in final_history(s3_bucket, "runs/")] == list(range(1, 11))
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/other/"):
        final_history(s3_bucket, "other/")
