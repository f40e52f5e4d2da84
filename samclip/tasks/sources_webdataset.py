"""WebDataset tar shards as img2dataset writes them: read, decode-check and address members.

img2dataset writes shards ``00000.tar`` holding, per sample, ``{key}.jpg`` (or another image
extension), ``{key}.txt`` (the caption) and ``{key}.json`` (url, caption, status, sizes), and
beside each shard ``00000.parquet`` with one row per attempted sample (``key``, ``url``,
``caption``, ``status``, ...) and ``00000_stats.json``. As WebDataset does, a sample's key is
the member path up to the first dot of its file name.

Each shard is read once, front to back, by one Ray Data task, which checks every image member
as it passes. An accepted image is addressed by a member URI (``storage.member_uri``): the
shard's URI with the member's byte offset and size, so precompute and training read it with
one ranged read.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from typing import Any

import pyarrow as pa

from samclip.tasks import storage
from samclip.tasks.image_checks import check_image_bytes, rows_to_table, unreadable_row

logger = logging.getLogger(__name__)

SHARD_SUFFIX = ".tar"
REASON_CORRUPT_ARCHIVE = "corrupt_archive"
METADATA_COLUMNS = ("key", "caption", "url", "status")


def list_shards(source: str) -> list[str]:
    """List the tar shards under a folder or prefix, recursively, sorted."""
    return storage.list_files(source, suffix=SHARD_SUFFIX)


def sample_key(member_name: str) -> tuple[str, str]:
    """Split a member path into (sample key, extension), at the first dot of the file name."""
    folder, name = posixpath.split(member_name)
    stem, dot, extension = name.partition(".")
    key = posixpath.join(folder, stem) if folder else stem
    return key, extension.lower() if dot else ""


def check_shard_batch(
    batch: pa.Table,
    decode_limits: dict[str, Any],
    image_extensions: tuple[str, ...],
    endpoint_url: str | None = None,
) -> pa.Table:
    """Decode-check every image member of each shard in a batch (a Ray Data UDF).

    Returns one check row per image member, with the sample's key, caption and url. A shard
    that cannot be opened, or that ends in the middle of a member, adds one row for the shard
    itself with reason ``corrupt_archive``; the members read before the damage keep their rows.
    """
    storage.configure_endpoint(endpoint_url)
    extensions = tuple(extension.lstrip(".").lower() for extension in image_extensions)
    rows: list[dict[str, Any]] = []
    for shard in batch.column("uri").to_pylist():
        rows.extend(_check_shard(shard, decode_limits, extensions))
    return rows_to_table(rows)


def _check_shard(
    shard: str, decode_limits: dict[str, Any], extensions: tuple[str, ...]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    captions: dict[str, str] = {}
    metadata: dict[str, dict[str, Any]] = _read_sidecar(shard)

    fs, path = storage.filesystem(shard)
    try:
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as archive:
            # "r|" streams the shard once; each member's bytes must be read before the next.
            for member in archive:
                if not member.isfile():
                    continue
                key, extension = sample_key(member.name)
                payload = archive.extractfile(member)
                data = payload.read() if payload is not None else b""
                if extension in extensions:
                    uri = storage.member_uri(shard, member.offset_data, member.size, member.name)
                    row = check_image_bytes(uri, data, decode_limits)
                    row["key"] = key
                    rows.append(row)
                elif extension == "txt":
                    captions[key] = data.decode("utf-8", errors="replace").strip()
                elif extension == "json":
                    metadata.setdefault(key, {}).update(_parse_json(data))
    except (tarfile.TarError, EOFError, OSError) as error:
        rows.append(unreadable_row(shard, error, REASON_CORRUPT_ARCHIVE))

    for row in rows:
        key = row["key"]
        if key is None:
            continue
        info = metadata.get(key, {})
        row["caption"] = captions.get(key) or info.get("caption")
        row["url"] = info.get("url")
    return rows


def _read_sidecar(shard: str) -> dict[str, dict[str, Any]]:
    """Read img2dataset's per-shard Parquet beside a shard, if there is one: key -> metadata."""
    sidecar = shard[: -len(SHARD_SUFFIX)] + ".parquet"
    if not storage.exists(sidecar):
        return {}
    table = storage.read_parquet(sidecar)
    columns = [name for name in METADATA_COLUMNS if name in table.column_names]
    if "key" not in columns:
        logger.warning("%s has no 'key' column; its metadata is ignored", sidecar)
        return {}
    return {str(row["key"]): row for row in table.select(columns).to_pylist()}


def _parse_json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def download_status_counts(shards: list[str]) -> dict[str, int]:
    """Count img2dataset's per-sample ``status`` values over the shards' Parquet sidecars.

    Samples that failed to download have a row there but no member in the shard, so these
    counts explain why a shard holds fewer images than were requested.
    """
    counts: dict[str, int] = {}
    for shard in shards:
        sidecar = shard[: -len(SHARD_SUFFIX)] + ".parquet"
        if not storage.exists(sidecar):
            continue
        schema = storage.read_parquet_schema(sidecar)
        if "status" not in schema.names:
            continue
        for status in storage.read_parquet(sidecar, columns=["status"]).column("status").to_pylist():
            counts[str(status)] = counts.get(str(status), 0) + 1
    return counts
