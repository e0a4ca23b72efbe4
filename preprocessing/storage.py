"""Local paths and ``s3://bucket/prefix`` URIs behind one small API.

Everything that reads or writes datasets, Parquet or checkpoints goes through here, so that a
dataset root can be a local folder or an S3 prefix (AWS or any S3-compatible endpoint). The
endpoint comes from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (passed to boto3 and to
pyarrow explicitly, so that older clients that ignore the variables still honour it);
credentials come from the usual AWS environment / config chain.

Every S3 call has a connect timeout, a read timeout and a bounded number of attempts (boto3 and
pyarrow alike): ``POSE2SEG_S3_CONNECT_TIMEOUT_S`` (default 10), ``POSE2SEG_S3_READ_TIMEOUT_S``
(default 60) and ``POSE2SEG_S3_MAX_ATTEMPTS`` (default ``AWS_MAX_ATTEMPTS``, else 3). An endpoint
that refuses, drops or never answers a boto3 call is one :class:`S3UnreachableError` naming the
endpoint, the operation and the URI.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

S3_SCHEME = "s3://"


def is_remote(uri: str) -> bool:
    """True for ``s3://`` URIs, false for local paths."""
    return uri.startswith(S3_SCHEME)


def join(base: str, *parts: str) -> str:
    """Join path parts onto ``base``; an absolute path or a URI among ``parts`` replaces it.

    ``join("s3://b/data", "images/train")`` is ``"s3://b/data/images/train"``;
    ``join("data", "/abs/x.json")`` is ``"/abs/x.json"``.
    """
    out = base
    for part in parts:
        if not part:
            continue
        if is_remote(part) or os.path.isabs(part):
            out = part
        elif is_remote(out):
            out = out.rstrip("/") + "/" + part.lstrip("/")
        else:
            out = os.path.join(out, part)
    return out


class UnsafePathError(ValueError):
    """A file name that would resolve outside the folder it must stay in."""


def resolve_inside(root: str, name: str) -> str:
    """``root`` joined with the relative ``name``, which must stay inside ``root``.

    ``name`` comes from a dataset (a COCO ``file_name``): it may not be absolute, a URI, or
    hold a ``..`` component, and a local path may not leave ``root`` through a symbolic link
    (the real path of the result must lie under the real path of ``root``). S3 has no links,
    so for ``s3://`` the name's own check is enough. Raises :class:`UnsafePathError` naming
    the file and the root.
    """
    text = str(name)
    problem = ""
    parts = text.replace("\\", "/").split("/")
    if not text.strip():
        problem = "is empty"
    elif "\x00" in text:
        problem = "holds a NUL byte"
    elif "://" in text or text.startswith(("/", "\\")) or os.path.isabs(text):
        problem = "is absolute or a URI"
    elif len(text) > 1 and text[1] == ":" and text[0].isalpha():
        problem = "is a drive path"
    elif ".." in parts:
        problem = "holds a '..' component"
    if problem:
        raise UnsafePathError(f"file_name {text!r} {problem}; it must stay inside {root}")
    joined = join(root, "/".join(p for p in parts if p not in ("", ".")))
    if not is_remote(root):
        real_root = os.path.realpath(root)
        real = os.path.realpath(joined)
        if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
            raise UnsafePathError(
                f"file_name {text!r} resolves to {real} through a symbolic link, outside {root}"
            )
    return joined


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; raises ValueError for a URI without bucket."""
    if not is_remote(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len(S3_SCHEME) :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def endpoint_url() -> str | None:
    """The S3 endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, or None for AWS."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


CONNECT_TIMEOUT_ENV = "POSE2SEG_S3_CONNECT_TIMEOUT_S"
READ_TIMEOUT_ENV = "POSE2SEG_S3_READ_TIMEOUT_S"
MAX_ATTEMPTS_ENV = "POSE2SEG_S3_MAX_ATTEMPTS"


@dataclass(frozen=True)
class S3Timeouts:
    """How long one S3 request may take to connect and to answer, and how often it is tried."""

    connect_s: float = 10.0
    read_s: float = 60.0
    max_attempts: int = 3

    def describe(self) -> str:
        return (
            f"connect timeout {self.connect_s:g} s, read timeout {self.read_s:g} s, "
            f"{self.max_attempts} attempt(s)"
        )


def _env_number(name: str, default: float, *, integer: bool = False) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = -1
    if not value > 0:
        kind = "a positive integer" if integer else "a positive number of seconds"
        raise ValueError(f"{name}={text!r}: expected {kind}")
    return value


def s3_timeouts() -> S3Timeouts:
    """The S3 timeouts and attempts from the environment (see the module docstring)."""
    attempts_default = 3
    if os.environ.get("AWS_MAX_ATTEMPTS", "").strip().isdigit():
        attempts_default = max(1, int(os.environ["AWS_MAX_ATTEMPTS"]))
    return S3Timeouts(
        connect_s=_env_number(CONNECT_TIMEOUT_ENV, 10.0),
        read_s=_env_number(READ_TIMEOUT_ENV, 60.0),
        max_attempts=int(_env_number(MAX_ATTEMPTS_ENV, attempts_default, integer=True)),
    )


class S3UnreachableError(OSError):
    """An S3 endpoint refused, dropped or never answered a request (after every attempt)."""


_CLIENTS: dict[tuple[Any, ...], Any] = {}


def s3_client() -> Any:
    """A boto3 S3 client for the current endpoint, credentials and timeouts (cached)."""
    import boto3
    from botocore.config import Config as BotoConfig

    limits = s3_timeouts()
    cache_key = (endpoint_url(), os.environ.get("AWS_ACCESS_KEY_ID"), limits)
    client = _CLIENTS.get(cache_key)
    if client is None:
        client = boto3.client(
            "s3",
            endpoint_url=cache_key[0],
            config=BotoConfig(
                connect_timeout=limits.connect_s,
                read_timeout=limits.read_s,
                retries={"max_attempts": limits.max_attempts, "mode": "standard"},
            ),
        )
        _CLIENTS[cache_key] = client
    return client


@contextlib.contextmanager
def s3_call(operation: str, uri: str) -> Iterator[None]:
    """Turn a connection failure or timeout of a boto3 call into one
    :class:`S3UnreachableError` line naming the endpoint, ``operation`` and ``uri``."""
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    try:
        yield
    except (
        ConnectTimeoutError,
        ReadTimeoutError,
        EndpointConnectionError,
        ConnectionClosedError,
    ) as exc:
        endpoint = endpoint_url() or "AWS S3"
        what = "never answered" if isinstance(exc, ReadTimeoutError) else "could not be reached"
        raise S3UnreachableError(
            f"S3 endpoint {endpoint} {what} for {operation} of {uri} "
            f"({s3_timeouts().describe()}; {type(exc).__name__}); set "
            f"{READ_TIMEOUT_ENV} / {CONNECT_TIMEOUT_ENV} / {MAX_ATTEMPTS_ENV} to change them"
        ) from None


class S3RequestError(OSError):
    """An S3 request that the endpoint answered with an error (access denied, no such bucket)."""


# pyarrow's S3 errors (Arrow's s3fs): "When getting information for key 'k' in bucket 'b': AWS
# Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Couldn't connect to server"
_PYARROW_S3 = re.compile(r"AWS Error (?P<kind>[A-Z_]+)\b.*? during (?P<op>\w+) operation: ?(?P<detail>.*)")
_KEY_IN_BUCKET = re.compile(r"key '(?P<key>[^']*)' in bucket '(?P<bucket>[^']*)'")
_BUCKET = re.compile(r"bucket '(?P<bucket>[^']*)'")
_CURL_TIMEOUT = 28  # curl's "Timeout was reached": connected (or not) and nothing came back


def explain_s3_error(exc: BaseException) -> BaseException:
    """A pyarrow S3 error (Ray Data's and pyarrow's reads and writes of ``s3://`` Parquet)
    rebuilt to name the endpoint and the URI, as :func:`s3_call` does for boto3: an endpoint
    that refused or never answered -> :class:`S3UnreachableError` with the same line; an
    error answer -> :class:`S3RequestError`. Any other exception is returned unchanged."""
    if not isinstance(exc, OSError) or isinstance(exc, S3UnreachableError | S3RequestError):
        return exc
    text = " ".join(str(exc).split())
    match = _PYARROW_S3.search(text)
    if match is None or "S3 endpoint " in text:  # not pyarrow's, or already named
        return exc
    where = _KEY_IN_BUCKET.search(text) or _BUCKET.search(text)
    if where is None:
        uri = "S3"
    elif "key" in where.groupdict():
        uri = f"{S3_SCHEME}{where['bucket']}/{where['key']}".rstrip("/")
    else:
        uri = f"{S3_SCHEME}{where['bucket']}"
    endpoint = endpoint_url() or "AWS S3"
    operation, detail = match["op"], match["detail"].strip() or match["kind"]
    curl = re.search(r"curlCode: (\d+)", text)
    if match["kind"] == "NETWORK_CONNECTION" or curl is not None:
        never = curl is not None and int(curl.group(1)) == _CURL_TIMEOUT
        what = "never answered" if never else "could not be reached"
        return S3UnreachableError(
            f"S3 endpoint {endpoint} {what} for {operation} of {uri} "
            f"({s3_timeouts().describe()}; pyarrow: {detail}); set "
            f"{READ_TIMEOUT_ENV} / {CONNECT_TIMEOUT_ENV} / {MAX_ATTEMPTS_ENV} to change them"
        )
    return S3RequestError(
        f"S3 endpoint {endpoint} answered {operation} of {uri} with {match['kind']}: {detail}"
    )


def _is_missing(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


def read_bytes(uri: str) -> bytes:
    """The bytes of one file; FileNotFoundError naming ``uri`` when it does not exist."""
    if not is_remote(uri):
        try:
            with open(uri, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {uri}") from None
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        with s3_call("GetObject", uri):
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if _is_missing(exc):
            raise FileNotFoundError(f"no such object: {uri}") from None
        raise OSError(f"reading {uri} failed: {exc}") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri``, creating local parent folders as needed."""
    if not is_remote(uri):
        parent = os.path.dirname(uri)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(uri, "wb") as fh:
            fh.write(data)
        return
    bucket, key = split_s3(uri)
    with s3_call("PutObject", uri):
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)


def exists(uri: str) -> bool:
    """True when ``uri`` is an existing file/folder, an S3 object, or an S3 prefix with objects."""
    if not is_remote(uri):
        return os.path.exists(uri)
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    client = s3_client()
    if key and not key.endswith("/"):
        try:
            with s3_call("HeadObject", uri):
                client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if not _is_missing(exc):
                raise OSError(f"checking {uri} failed: {exc}") from exc
    prefix = key.rstrip("/") + "/" if key else ""
    try:
        with s3_call("ListObjectsV2", uri):
            listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except ClientError as exc:
        if _is_missing(exc):
            return False
        raise OSError(f"listing {uri} failed: {exc}") from exc
    return listed.get("KeyCount", 0) > 0


def list_files(uri: str, suffix: str | None = None) -> list[str]:
    """All files below the folder/prefix ``uri`` (recursive, sorted), as full paths/URIs.

    Only names ending in ``suffix`` when given. A missing local folder raises
    FileNotFoundError naming it; a missing S3 prefix lists as empty (S3 has no folders, and
    the empty ``<folder>/`` objects some tools store as folders are not listed).
    """
    found: list[str] = []
    if not is_remote(uri):
        if not os.path.isdir(uri):
            raise FileNotFoundError(f"no such folder: {uri}")
        for dirpath, _, filenames in os.walk(uri):
            found.extend(os.path.join(dirpath, name) for name in filenames)
    else:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        paginator = s3_client().get_paginator("list_objects_v2")
        try:
            with s3_call("ListObjectsV2", uri):
                for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                    found.extend(
                        f"{S3_SCHEME}{bucket}/{obj['Key']}"
                        for obj in page.get("Contents", [])
                        # An empty "<folder>/" object is a folder marker (pyarrow, which Ray
                        # Train uploads checkpoints with, writes one per folder), not a file.
                        if not obj["Key"].endswith("/")
                    )
        except ClientError as exc:
            if _is_missing(exc):
                raise FileNotFoundError(f"no such bucket: {uri}") from None
            raise OSError(f"listing {uri} failed: {exc}") from exc
    if suffix:
        found = [f for f in found if f.endswith(suffix)]
    return sorted(found)


def list_dirs(uri: str) -> list[str]:
    """Names of the immediate sub-folders of a local folder / S3 prefix (sorted); [] when absent."""
    if not is_remote(uri):
        if not os.path.isdir(uri):
            return []
        return sorted(e.name for e in os.scandir(uri) if e.is_dir())
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    names: set[str] = set()
    paginator = s3_client().get_paginator("list_objects_v2")
    try:
        with s3_call("ListObjectsV2", uri):
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                for entry in page.get("CommonPrefixes", []):
                    names.add(entry["Prefix"][len(prefix) :].rstrip("/"))
    except ClientError as exc:
        if _is_missing(exc):
            return []
        raise OSError(f"listing {uri} failed: {exc}") from exc
    return sorted(n for n in names if n)


def upload_dir(local_dir: str, uri: str) -> int:
    """Copy every file below ``local_dir`` to ``uri`` (a local folder or S3 prefix); returns the count."""
    files = list_files(local_dir)
    for path in files:
        rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
        target = join(uri, rel)
        if is_remote(target):
            bucket, key = split_s3(target)
            with s3_call("PutObject", target):
                s3_client().upload_file(path, bucket, key)
        else:
            with open(path, "rb") as fh:
                write_bytes(target, fh.read())
    return len(files)


def download_dir(uri: str, local_dir: str) -> int:
    """Copy every file below ``uri`` into ``local_dir`` keeping relative paths; returns the count."""
    files = list_files(uri)
    if is_remote(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        for file_uri in files:
            _, file_key = split_s3(file_uri)
            target = os.path.join(local_dir, *file_key[len(prefix) :].split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with s3_call("GetObject", file_uri):
                s3_client().download_file(bucket, file_key, target)
    else:
        for path in files:
            target = os.path.join(local_dir, os.path.relpath(path, uri))
            write_bytes(target, read_bytes(path))
    return len(files)


def pyarrow_filesystem(uri: str) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path)`` for ``uri``, for Ray Data's read/write_parquet.

    Local paths give a LocalFileSystem and the absolute path. ``s3://bucket/key`` gives an
    S3FileSystem (with ``endpoint_override`` and the scheme taken from the endpoint env var when
    one is set, and the timeouts and attempts of :func:`s3_timeouts`) and ``bucket/key``.
    """
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    bucket, key = split_s3(uri)
    limits = s3_timeouts()
    kwargs: dict[str, Any] = {
        "connect_timeout": limits.connect_s,
        "request_timeout": limits.read_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=limits.max_attempts),
    }
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    endpoint = endpoint_url()
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        if not host:
            scheme, host = "https", endpoint
        kwargs["endpoint_override"] = host.rstrip("/")
        kwargs["scheme"] = scheme
    return pafs.S3FileSystem(**kwargs), posixpath.join(bucket, key) if key else bucket
