"""Storage on any fsspec URI, with atomic commits.

Nothing appears at its final key until it is complete: local files are written to a
temporary name in the same folder and renamed; object stores receive a single PUT of the
whole object, which S3-compatible stores make visible only once complete. A crash therefore
never leaves a truncated file that looks valid, and a rerun can trust that what exists is whole.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import time
import uuid
from datetime import datetime
from urllib.parse import quote, unquote
from functools import lru_cache
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
# The temporary names that ``_local_commit`` gives: TMP_PREFIX, 32 hex digits of a uuid4, a
# dash, then the final file name. Only names of this form are ever removed as stale.
TMP_NAME_PATTERN = re.compile(re.escape(TMP_PREFIX) + r"[0-9a-f]{32}-.+")

# A member of an archive (a WebDataset tar shard) is addressed as a byte range of the archive:
# ``{archive_uri}#offset={first byte}&size={bytes}&member={percent-encoded name}``. A reader
# fetches exactly those bytes with one ranged read, without listing the archive again.
MEMBER_PATTERN = re.compile(
    r"^(?P<archive>.+)#offset=(?P<offset>\d+)&size=(?P<size>\d+)&member=(?P<member>.+)$"
)

# Variables that configure S3 access. A step copies them into its Ray workers' environment,
# because workers of an already running cluster do not see the driver's later changes.
# S3 settings passed on to Ray workers. Credentials are deliberately absent: Ray logs every
# runtime_env with its values, so workers read AWS_ACCESS_KEY_ID and friends from their own
# node's environment (inherited from the process that started a local Ray, or set on the
# cluster's nodes, for example from a Kubernetes secret).
S3_ENV_VARS = (
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_EC2_METADATA_DISABLED",
    "SAMCLIP_S3_ENDPOINT_URL",
)


def storage_options(uri: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """Return fsspec options for a URI: the S3 endpoint when one is configured.

    Credentials are never passed here; s3fs reads the standard AWS_* variables itself, so no
    secret ends up in a config, a log or a saved artifact.
    """
    endpoint = endpoint_url or os.environ.get("SAMCLIP_S3_ENDPOINT_URL")
    if uri.startswith("s3://") and endpoint:
        return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def configure_endpoint(endpoint_url: str | None) -> None:
    """Make a configured S3 endpoint the default for this process (the driver or a Ray worker).

    Every helper here reads ``SAMCLIP_S3_ENDPOINT_URL``; Ray workers are separate processes, so
    a step passes ``storage.endpoint_url`` to its workers and each calls this first. None keeps
    whatever the environment already sets.
    """
    if endpoint_url:
        os.environ["SAMCLIP_S3_ENDPOINT_URL"] = endpoint_url
    if os.environ.get("SAMCLIP_S3_ENDPOINT_URL"):
        # With a configured endpoint every request must go there. botocore's credential chain
        # would otherwise ask the EC2 instance-metadata address when no key is set.
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def worker_environment() -> dict[str, str]:
    """Return this process's non-secret S3 settings, to pass to Ray workers as ``runtime_env``.

    Only variables that are set are returned; an empty dict means the workers keep their own.
    Credentials never travel this way (see ``S3_ENV_VARS``).
    """
    return {name: os.environ[name] for name in S3_ENV_VARS if os.environ.get(name)}


def ray_remote_args() -> dict[str, Any]:
    """Return Ray remote arguments that give a worker this process's S3 settings."""
    env = worker_environment()
    return {"runtime_env": {"env_vars": env}} if env else {}


def pyarrow_s3_filesystem(endpoint_url: str | None = None) -> pafs.S3FileSystem:
    """Return pyarrow's native S3 filesystem for the configured endpoint and AWS_* credentials.

    Use this where a reader needs pyarrow's own S3 client (Ray Data's ``filesystem=``, Ray
    Train's ``storage_filesystem``); ``pyarrow_filesystem`` wraps s3fs instead.
    """
    endpoint = endpoint_url or os.environ.get("SAMCLIP_S3_ENDPOINT_URL")
    kwargs: dict[str, Any] = {
        "access_key": os.environ.get("AWS_ACCESS_KEY_ID"),
        "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
        "session_token": os.environ.get("AWS_SESSION_TOKEN"),
        # An explicit region keeps the AWS SDK from looking it up on the metadata service.
        "region": (
            os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        ),
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
    return pafs.S3FileSystem(**{key: value for key, value in kwargs.items() if value is not None})


def member_uri(archive_uri: str, offset: int, size: int, member: str) -> str:
    """Address ``size`` bytes at ``offset`` of an archive, named ``member``, as one URI."""
    return f"{archive_uri}#offset={int(offset)}&size={int(size)}&member={quote(member, safe='/')}"


def parse_member_uri(uri: str) -> tuple[str, int, int, str] | None:
    """Return (archive URI, offset, size, member name) of a member URI, or None for other URIs."""
    match = MEMBER_PATTERN.match(uri)
    if match is None:
        return None
    return (
        match["archive"], int(match["offset"]), int(match["size"]), unquote(match["member"])
    )


@lru_cache(maxsize=16)
def _filesystem(protocol_key: str, endpoint: str | None) -> fsspec.AbstractFileSystem:
    options = storage_options(protocol_key, endpoint)
    return fsspec.filesystem(protocol_key.split("://")[0] if "://" in protocol_key else "file", **options)


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem of a URI and the path within it."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    endpoint = endpoint_url or os.environ.get("SAMCLIP_S3_ENDPOINT_URL")
    fs = _filesystem(f"{protocol}://", endpoint if protocol == "s3" else None)
    path = fs._strip_protocol(uri)
    if protocol == "file":
        path = os.path.abspath(path)
    return fs, path


def pyarrow_filesystem(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """Return a pyarrow filesystem and path for a URI (for Ray Data and Ray Train storage)."""
    fs, path = filesystem(uri, endpoint_url)
    if _is_local(fs):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    """Join parts onto a URI with forward slashes."""
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts if p]])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def remove(uri: str) -> None:
    """Delete one file or object; a missing one is not an error."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm_file(path)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if _is_local(fs):  # object stores have no folders to create
        fs.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def _local_commit(path: str):
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name starts with ``TMP_PREFIX``, so listings skip it, and it is removed on
    any error, so a failed write never leaves a file at the final name.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(uri: str, data: bytes) -> None:
    """Write bytes to a URI atomically: the final key exists only once all bytes are there."""
    fs, path = filesystem(uri)
    if _is_local(fs):
        with _local_commit(path) as tmp, open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    else:
        # One PUT of the whole object: S3 never exposes a partial object at its key.
        fs.pipe_file(path, data)


def read_bytes(uri: str) -> bytes:
    """Read a whole file, or the byte range that a member URI (``member_uri``) addresses."""
    member = parse_member_uri(uri)
    if member is not None:
        archive, offset, size, name = member
        fs, path = filesystem(archive)
        data = fs.cat_file(path, start=offset, end=offset + size)
        if len(data) != size:
            raise OSError(
                f"member {name} of {archive}: read {len(data)} bytes at offset {offset}, "
                f"expected {size}; the archive is shorter than when it was listed"
            )
        return data
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return handle.read()


def write_json(uri: str, payload: Any) -> None:
    write_bytes(uri, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def write_parquet(table: pa.Table, uri: str) -> None:
    """Serialise a table in memory and commit it atomically."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(uri, buffer.getvalue())


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def read_parquet_schema(uri: str) -> pa.Schema:
    """Read a Parquet file's schema (with its metadata) from the footer, without the data."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return pq.read_schema(handle)


def put_file(local: str, uri: str) -> None:
    """Copy a local file to a URI atomically, streaming it rather than holding it in memory."""
    fs, path = filesystem(uri)
    if _is_local(fs):
        with _local_commit(path) as tmp:
            shutil.copyfile(local, tmp)
    else:
        # s3fs uploads large files in parts; S3 shows the object only after the upload completes.
        fs.put_file(local, path)


def get_file(uri: str, local: str) -> None:
    """Download a URI to a local path atomically: the path exists only once the copy is whole."""
    fs, path = filesystem(uri)
    with _local_commit(local) as tmp:
        fs.get_file(path, tmp)


def file_info(uri: str) -> dict[str, Any]:
    """Return the store's metadata of one file (size, and ETag or modification time)."""
    fs, path = filesystem(uri)
    return fs.info(path)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """List complete files under a URI (recursively), skipping temporary names; sorted URIs."""
    fs, path = filesystem(uri)
    # s3fs caches listings per process; files written by Ray workers would otherwise stay unseen.
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    found = []
    for name in fs.find(path):
        base = name.rsplit("/", 1)[-1]
        if base.startswith(TMP_PREFIX) or not base.endswith(suffix):
            continue
        found.append(_to_uri(uri, fs, name))
    return sorted(found)


def remove_stale_temp_files(uri: str, older_than_s: float | None) -> list[str]:
    """Remove the temporary files that killed writers left under a folder or prefix.

    Only files named as ``_local_commit`` names them (``TMP_NAME_PATTERN``) and last modified
    more than ``older_than_s`` seconds ago are removed, recursively. A running writer modifies
    its temporary file as it writes and renames it right after the last write, so its file is
    younger than any age of minutes or more. Committed files never match the pattern. Returns
    the removed URIs. ``older_than_s`` None removes nothing.
    """
    if older_than_s is None:
        return []
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    cutoff = time.time() - older_than_s
    removed = []
    for name, info in fs.find(path, detail=True).items():
        base = name.rsplit("/", 1)[-1]
        if not TMP_NAME_PATTERN.fullmatch(base) or info.get("type") == "directory":
            continue
        modified = _modified_seconds(info)
        if modified is None or modified > cutoff:
            continue
        try:
            fs.rm_file(name)
        except FileNotFoundError:
            continue  # another cleaner, or the writer's own error handling, removed it first
        removed.append(_to_uri(uri, fs, name))
    if removed:
        logger.info(
            "removed %d stale temporary files older than %.0f s under %s (first: %s)",
            len(removed), older_than_s, uri, removed[0],
        )
    return sorted(removed)


def _modified_seconds(info: dict[str, Any]) -> float | None:
    """Return a listing entry's modification time in epoch seconds, or None when it has none.

    fsspec's local filesystem reports ``mtime`` (epoch seconds); s3fs reports
    ``LastModified`` (a timezone-aware datetime).
    """
    value = info.get("mtime", info.get("LastModified"))
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    return None


def local_path(uri: str) -> str | None:
    """Return the local path of a file:// or plain-path URI, or None for remote stores."""
    fs, path = filesystem(uri)
    return path if _is_local(fs) else None


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _to_uri(base_uri: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    if _is_local(fs):
        return path
    protocol = base_uri.split("://", 1)[0]
    return f"{protocol}://{path}"
