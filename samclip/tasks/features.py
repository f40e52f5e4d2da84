"""Feature shards: teacher embeddings stored as Parquet, keyed by image hash.

A feature folder ``{features_root}/{kind}-{fingerprint}/`` contains shards named
``part-{digest}.parquet``, where the digest is the sha256 of the sorted image hashes inside the
shard, so two runs never write the same name with different rows. Each shard has two columns:

- ``hash`` (string): sha256 hex of the image file's bytes, as in the curation manifest;
- ``embedding`` (binary): one row's array as raw little-endian bytes.

The schema metadata stores ``dtype`` (``float16`` or ``float32``) and ``shape`` (JSON list, the
shape of one row's array), so any Parquet reader can rebuild the arrays with numpy alone, and
no Ray extension type is involved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from samclip.tasks import storage

logger = logging.getLogger(__name__)

FORMAT = "samclip-features/1"
SUPPORTED_DTYPES = ("float16", "float32")
SHARD_PATTERN = re.compile(r"part-[0-9a-f]{64}\.parquet")


@dataclass(frozen=True)
class FeatureLayout:
    """The dtype and per-row shape shared by every shard of a feature folder."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def shard_name(hashes: Iterable[str]) -> str:
    """Name a shard by the sha256 of its sorted image hashes, one per line."""
    digest = hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()
    return f"part-{digest}.parquet"


def write_feature_shard(
    uri_dir: str,
    hashes: list[str],
    arrays: np.ndarray,
    dtype: str,
    shape: tuple[int, ...] | None = None,
) -> str:
    """Write one shard of embeddings atomically and return its URI.

    ``arrays`` is (N, *shape) with ``arrays[i]`` the embedding of ``hashes[i]``. Its dtype must
    already be ``dtype`` because nothing is cast silently, and when ``shape`` is given each row
    must have it. A shard with the same name already contains exactly these hashes, so it is
    left as it is.
    """
    layout = _validate_rows(hashes, arrays, dtype, shape)
    uri = storage.join(uri_dir, shard_name(hashes))
    if storage.exists(uri):
        logger.debug("shard %s already exists; keeping it", uri)
        return uri

    embedding = encode_embeddings(arrays, layout)
    metadata = {
        "format": FORMAT,
        "dtype": layout.dtype,
        "shape": json.dumps(list(layout.shape)),
    }
    table = pa.table({"hash": pa.array(hashes, pa.string()), "embedding": embedding})
    storage.write_parquet(table.replace_schema_metadata(metadata), uri)
    return uri


def encode_embeddings(arrays: np.ndarray, layout: FeatureLayout) -> pa.Array:
    """Pack (N, *shape) arrays into a binary column of raw little-endian rows."""
    little_endian = np.ascontiguousarray(arrays, dtype=np.dtype(layout.dtype).newbyteorder("<"))
    count = int(arrays.shape[0])
    # One values buffer plus offsets builds the column without a Python bytes object per row.
    offsets = np.arange(count + 1, dtype=np.int64) * layout.row_bytes
    values = pa.py_buffer(little_endian.reshape(-1).view(np.uint8))
    column = pa.Array.from_buffers(pa.large_binary(), count, [None, pa.py_buffer(offsets), values])
    return column.cast(pa.binary())


def decode_embeddings(
    column: pa.Array | pa.ChunkedArray, layout: FeatureLayout, source: str = "column"
) -> np.ndarray:
    """Rebuild writable (N, *shape) arrays from a binary column of raw little-endian rows.

    Raises ValueError naming ``source`` when a row is null or has the wrong number of bytes.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.cast(pa.large_binary())
    count = len(values)
    if count == 0:
        return np.empty((0, *layout.shape), dtype=layout.dtype)
    if values.null_count:
        raise ValueError(f"{source} has {values.null_count} null embeddings")
    all_offsets = np.frombuffer(values.buffers()[1], dtype=np.int64)
    offsets = all_offsets[values.offset : values.offset + count + 1]
    lengths = np.diff(offsets)
    if not np.all(lengths == layout.row_bytes):
        bad = int(np.flatnonzero(lengths != layout.row_bytes)[0])
        raise ValueError(
            f"{source} row {bad} has {int(lengths[bad])} bytes, expected "
            f"{layout.row_bytes} for {layout.dtype} {layout.shape}"
        )
    data = np.frombuffer(values.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    stored = np.dtype(layout.dtype).newbyteorder("<")
    # the copy makes the arrays writable and native-endian
    return data.view(stored).reshape(count, *layout.shape).astype(layout.dtype, copy=True)


def list_shards(uri_dir: str) -> list[str]:
    """List the complete shards of a feature folder (temporary and other files are skipped)."""
    return [
        uri
        for uri in storage.list_files(uri_dir, suffix=".parquet")
        if SHARD_PATTERN.fullmatch(uri.rsplit("/", 1)[-1])
    ]


def read_layout(uri_dir: str, expected: FeatureLayout | None = None) -> FeatureLayout | None:
    """Return the layout shared by every shard, or None for an empty folder.

    Raises ValueError naming the first shard whose dtype or shape differs from ``expected`` (or,
    without ``expected``, from the first shard).
    """
    layout = expected
    for uri in list_shards(uri_dir):
        layout = _check_layout(uri, storage.read_parquet_schema(uri), layout)
    return layout


def read_feature_hashes(uri_dir: str, expected: FeatureLayout | None = None) -> set[str]:
    """Return the image hashes present in a feature folder, reading only the hash column."""
    found: set[str] = set()
    layout = expected
    for uri in list_shards(uri_dir):
        table = storage.read_parquet(uri, columns=["hash"])
        layout = _check_layout(uri, table.schema, layout)
        found.update(table.column("hash").to_pylist())
    return found


def read_features(
    uri_dir: str,
    hashes: Iterable[str] | None = None,
    expected: FeatureLayout | None = None,
) -> dict[str, np.ndarray]:
    """Read embeddings by image hash: all of them, or only ``hashes``.

    Returns writable arrays in the stored dtype, each of the stored per-row shape. Raises
    KeyError when a requested hash is in no shard, and ValueError when shards disagree on
    dtype or shape.
    """
    requested = None if hashes is None else set(hashes)
    found: dict[str, np.ndarray] = {}
    layout = expected
    for uri in list_shards(uri_dir):
        if requested is not None:
            shard_hashes = storage.read_parquet(uri, columns=["hash"])
            layout = _check_layout(uri, shard_hashes.schema, layout)
            if requested.isdisjoint(shard_hashes.column("hash").to_pylist()):
                continue
        table = storage.read_parquet(uri)
        layout = _check_layout(uri, table.schema, layout)
        assert layout is not None
        arrays = decode_embeddings(table.column("embedding"), layout, f"feature shard {uri}")
        for index, key in enumerate(table.column("hash").to_pylist()):
            if requested is None or key in requested:
                found[key] = arrays[index]

    if requested is not None and len(found) < len(requested):
        missing = sorted(requested - found.keys())
        raise KeyError(
            f"{len(missing)} of {len(requested)} requested hashes are not in {uri_dir} "
            f"(first: {missing[0]}); run precompute on the manifest that lists them"
        )
    return found


def _validate_rows(
    hashes: list[str], arrays: np.ndarray, dtype: str, shape: tuple[int, ...] | None
) -> FeatureLayout:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported feature dtype {dtype!r}: use one of {SUPPORTED_DTYPES}")
    if not isinstance(arrays, np.ndarray):
        raise ValueError(f"arrays must be a numpy array, got {type(arrays).__name__}")
    if arrays.dtype != np.dtype(dtype):
        raise ValueError(
            f"arrays have dtype {arrays.dtype}, expected {dtype}: "
            f"cast with arrays.astype({dtype!r})"
        )
    if arrays.ndim < 2:
        raise ValueError(
            f"arrays must be (N, *shape) with at least 2 dims, got shape {arrays.shape}"
        )
    if len(hashes) == 0:
        raise ValueError("a feature shard needs at least one row")
    if arrays.shape[0] != len(hashes):
        raise ValueError(f"{len(hashes)} hashes but {arrays.shape[0]} arrays")
    if len(set(hashes)) != len(hashes):
        raise ValueError("hashes in one shard must be unique")
    row_shape = tuple(int(size) for size in arrays.shape[1:])
    if shape is not None and row_shape != tuple(shape):
        raise ValueError(f"each row has shape {row_shape}, expected {tuple(shape)}")
    return FeatureLayout(dtype=dtype, shape=row_shape)


def _check_layout(uri: str, schema: pa.Schema, expected: FeatureLayout | None) -> FeatureLayout:
    metadata = schema.metadata or {}
    try:
        layout = FeatureLayout(
            dtype=metadata[b"dtype"].decode(),
            shape=tuple(json.loads(metadata[b"shape"])),
        )
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"feature shard {uri} has no valid dtype/shape metadata; it was not written by "
            "write_feature_shard: remove it"
        ) from error
    if expected is not None and layout != expected:
        raise ValueError(
            f"feature shard {uri} contains {layout.dtype} rows of shape {layout.shape}, expected "
            f"{expected.dtype} rows of shape {expected.shape}: features of another "
            "teacher or dtype are in this folder; remove that shard or use another folder"
        )
    return layout
