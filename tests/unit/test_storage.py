"""preprocessing.storage on local paths (S3 is exercised in tests/integration/test_s3_reader.py)."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from preprocessing import storage


def test_is_remote():
    assert storage.is_remote("s3://bucket/key")
    assert not storage.is_remote("/tmp/x")
    assert not storage.is_remote("data/s3://x")


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://b/data", ("images", "train"), "s3://b/data/images/train"),
        ("s3://b/data/", ("images/train",), "s3://b/data/images/train"),
        ("data", ("annotations/x.json",), os.path.join("data", "annotations/x.json")),
        ("data", ("/abs/x.json",), "/abs/x.json"),
        ("data", ("s3://other/x.json",), "s3://other/x.json"),
        ("s3://b/data", ("/abs/x.json",), "/abs/x.json"),
        ("s3://b/data", ("", "x"), "s3://b/data/x"),
    ],
)
def test_join(base, parts, expected):
    assert storage.join(base, *parts) == expected


def test_split_s3():
    assert storage.split_s3("s3://bucket/a/b.json") == ("bucket", "a/b.json")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match="without a bucket"):
        storage.split_s3("s3:///key")
    with pytest.raises(ValueError, match="not an s3"):
        storage.split_s3("/local/path")


def test_local_round_trip(tmp_path):
    target = str(tmp_path / "a" / "b" / "c.bin")
    assert not storage.exists(target)
    storage.write_bytes(target, b"payload")
    assert storage.exists(target)
    assert storage.read_bytes(target) == b"payload"


def test_read_missing_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        storage.read_bytes(missing)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        storage.list_files(str(tmp_path / "absent_dir"))


def test_list_files_recursive_sorted_and_filtered(tmp_path):
    for rel in ("b.png", "a.png", "sub/c.png", "sub/d.json"):
        storage.write_bytes(str(tmp_path / rel), rel.encode())
    listed = storage.list_files(str(tmp_path))
    assert listed == sorted(listed)
    assert [os.path.relpath(p, tmp_path) for p in listed] == [
        "a.png",
        "b.png",
        "sub/c.png",
        "sub/d.json",
    ]
    pngs = storage.list_files(str(tmp_path), suffix=".png")
    assert [os.path.basename(p) for p in pngs] == ["a.png", "b.png", "c.png"]


def test_upload_and_download_dir_locally(tmp_path):
    src, mid, dst = tmp_path / "src", tmp_path / "mid", tmp_path / "dst"
    storage.write_bytes(str(src / "x.txt"), b"x")
    storage.write_bytes(str(src / "deep" / "y.txt"), b"y")
    assert storage.upload_dir(str(src), str(mid)) == 2
    assert storage.download_dir(str(mid), str(dst)) == 2
    assert (dst / "x.txt").read_bytes() == b"x"
    assert (dst / "deep" / "y.txt").read_bytes() == b"y"


def test_pyarrow_filesystem_local(tmp_path):
    fs, path = storage.pyarrow_filesystem(str(tmp_path / "rel"))
    assert isinstance(fs, pafs.LocalFileSystem)
    assert os.path.isabs(path) and path.endswith("rel")


def test_pyarrow_filesystem_s3_uses_endpoint_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fs, path = storage.pyarrow_filesystem("s3://bucket/processed/train")
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bucket/processed/train"
    options = _s3_options(fs)
    assert (options["endpoint_override"], options["scheme"]) == ("127.0.0.1:9", "http")
    # AWS_ENDPOINT_URL_S3 wins over the generic variable, as in boto3.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.test")
    fs, _ = storage.pyarrow_filesystem("s3://bucket")
    options = _s3_options(fs)
    assert (options["endpoint_override"], options["scheme"]) == ("s3.example.test", "https")
    assert storage.endpoint_url() == "https://s3.example.test"


def _s3_options(fs: pafs.S3FileSystem) -> dict:
    # pyarrow exposes the constructor options only through pickling support.
    return fs.__reduce__()[1][0]


# pyarrow's own words (Arrow's s3fs), as Ray Data's and pyarrow's Parquet reads raise them.
_REFUSED = (
    "When getting information for key 'data/processed/val/part-0.parquet' in bucket 'bucket': "
    "AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect "
    "to server; Details: Failed to connect to 10.0.0.5 port 9000 after 0 ms: Could not connect "
    "to server"
)
_SILENT = (
    "When listing objects under key 'data/processed/val' in bucket 'bucket': AWS Error "
    "NETWORK_CONNECTION during ListObjectsV2 operation: curlCode: 28, Timeout was reached; "
    "Details: Operation too slow. Less than 1 bytes/sec transferred the last 1 seconds"
)
_DENIED = (
    "When reading information for key 'x.parquet' in bucket 'bucket': AWS Error ACCESS_DENIED "
    "during GetObject operation: Access Denied"
)


@pytest.mark.parametrize(
    "text,kind,words",
    [
        (_REFUSED, "S3UnreachableError", "could not be reached for HeadObject of s3://bucket/data/processed/val/part-0.parquet"),
        (_SILENT, "S3UnreachableError", "never answered for ListObjectsV2 of s3://bucket/data/processed/val"),
        (_DENIED, "S3RequestError", "answered GetObject of s3://bucket/x.parquet with ACCESS_DENIED"),
    ],
    ids=["refused", "silent", "denied"],
)
def test_a_pyarrow_s3_error_names_the_endpoint_the_operation_and_the_uri(
    monkeypatch, text, kind, words
):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.0.0.5:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    named = storage.explain_s3_error(OSError(text))
    assert type(named).__name__ == kind
    assert str(named).startswith("S3 endpoint http://10.0.0.5:9000 ") and words in str(named)
    other = FileNotFoundError("data/x.parquet")
    assert storage.explain_s3_error(other) is other  # anything else unchanged


def test_a_real_pyarrow_s3_failure_reaches_the_console_naming_the_endpoint(monkeypatch, capsys):
    """A real pyarrow read against an endpoint that refuses connections, through a command's
    error handling: one line naming the endpoint, the operation and the URI."""
    import pyarrow.parquet as pq

    from workflows.cli import run_main

    monkeypatch.delenv("POSE2SEG_DEBUG", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("POSE2SEG_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("POSE2SEG_S3_CONNECT_TIMEOUT_S", "2")
    uri = "s3://bucket/processed/val/part-0.parquet"

    def main(argv):
        fs, path = storage.pyarrow_filesystem(uri)
        pq.read_table(path, filesystem=fs)

    assert run_main(main, []) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: S3UnreachableError: S3 endpoint http://127.0.0.1:9 "), last
    assert uri in last and "Object" in last, last
