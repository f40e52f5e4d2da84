"""Bounded-memory selection for curation: spool check rows by hash prefix, decide bucket by bucket.

The check rows of tens of millions of images do not fit in the driver's memory, so curation
streams them into local Parquet files, one bucket per leading ``HASH_PREFIX_DIGITS`` hex digits
of the content hash. Every copy of an image has the same hash and so lands in the same bucket,
which makes each bucket de-duplicable on its own. Buckets taken in prefix order, each sorted
by hash, give the manifest in global hash order, so sampling and the limit see the same order
as a sort of all rows would. Rows without a hash (unreadable files, damaged archives) are
rejects only and go to one more bucket.

Each bucket's rejects are sorted by (uri, reason) into a run file, and the runs are merged into
one table with ``heapq.merge``, reading one record batch per run at a time.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from samclip.tasks import storage
from samclip.tasks.image_checks import CHECK_SCHEMA

# 256 buckets: 40M images give about 160k rows per bucket, which select_bucket keeps as
# Python dicts at once (an estimated few hundred MB).
HASH_PREFIX_DIGITS = 2
NO_HASH_BUCKET = "no-hash"
SPOOL_ROWS = 65_536  # check rows buffered before they are split into buckets and appended
MERGE_BATCH_ROWS = 4096  # rows read from each sorted run at a time while merging
REASON_DUPLICATE = "duplicate"


class CheckSpool:
    """Local Parquet files of check rows (``CHECK_SCHEMA``), one per hash-prefix bucket."""

    def __init__(self, folder: str, prefix_digits: int = HASH_PREFIX_DIGITS) -> None:
        self.folder = folder
        self.prefix_digits = prefix_digits
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writers: dict[str, pq.ParquetWriter] = {}

    def add(self, table: pa.Table) -> None:
        """Buffer a table of check rows; a full buffer is split into buckets and appended."""
        self._pending.append(table.cast(CHECK_SCHEMA))
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= SPOOL_ROWS:
            self._flush()

    def close(self) -> None:
        """Write what is buffered and close every bucket file."""
        self._flush()
        for writer in self._writers.values():
            writer.close()

    def buckets(self) -> list[str]:
        """Return the buckets that contain rows: hash prefixes in order, then the no-hash one."""
        names = sorted(name for name in self._writers if name != NO_HASH_BUCKET)
        return names + ([NO_HASH_BUCKET] if NO_HASH_BUCKET in self._writers else [])

    def read(self, bucket: str) -> pa.Table:
        return pq.read_table(self._path(bucket), schema=CHECK_SCHEMA)

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        prefixes = pc.utf8_slice_codeunits(table.column("hash"), 0, self.prefix_digits)
        keys = pc.fill_null(prefixes, NO_HASH_BUCKET)
        for key in pc.unique(keys).to_pylist():
            part = table.filter(pc.equal(keys, key))
            if key not in self._writers:
                self._writers[key] = pq.ParquetWriter(self._path(key), CHECK_SCHEMA)
            self._writers[key].write_table(part)

    def _path(self, bucket: str) -> str:
        return os.path.join(self.folder, f"bucket-{bucket}.parquet")


def select_bucket(
    table: pa.Table, sample_fraction: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """De-duplicate and sample one bucket's check rows.

    Returns (selected rows sorted by hash, rejects sorted by (uri, reason), rows sampled out).
    Rejects are the failed checks and the duplicates: of rows with the same hash the one
    first in ``uri_order`` is kept, and every other names it in its detail.
    """
    accepted: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for row in table.to_pylist():
        if row["reason"] is None:
            accepted.append(row)
        else:
            detail = row["detail"] or ""
            rejects.append({"uri": row["uri"], "reason": row["reason"], "detail": detail})

    first: dict[str, dict[str, Any]] = {}
    for row in sorted(accepted, key=lambda row: uri_order(row["uri"])):
        first.setdefault(row["hash"], row)
    for row in accepted:
        original = first[row["hash"]]
        if original is not row:
            rejects.append(
                {
                    "uri": row["uri"],
                    "reason": REASON_DUPLICATE,
                    "detail": f"same bytes as {original['uri']} (sha256 {row['hash'][:16]})",
                }
            )

    unique = list(first.values())
    sampled = [row for row in unique if hash_fraction(row["hash"], 0, 8) < sample_fraction]
    sampled.sort(key=lambda row: row["hash"])
    rejects.sort(key=reject_order)
    return sampled, rejects, len(unique) - len(sampled)


def uri_order(uri: str) -> tuple[str, int, str]:
    """Order files by URI, and members of one archive by their position in it."""
    member = storage.parse_member_uri(uri)
    if member is None:
        return (uri, 0, "")
    archive, offset, _, name = member
    return (archive, offset, name)


def reject_order(row: dict[str, Any]) -> tuple[str, str]:
    return (row["uri"], row["reason"])


def hash_fraction(digest: str, start: int, stop: int) -> float:
    """Map a slice of hex digits of a hash to [0, 1)."""
    return int(digest[start:stop], 16) / 16 ** (stop - start)


class ParquetStream:
    """A Parquet table written in pieces to a local file, then committed to a URI at once."""

    def __init__(self, local_path: str, uri: str, schema: pa.Schema) -> None:
        self.local_path = local_path
        self.uri = uri
        self.schema = schema
        self.rows = 0
        self._writer = pq.ParquetWriter(local_path, schema)

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._writer.write_table(pa.Table.from_pylist(rows, schema=self.schema))
            self.rows += len(rows)

    def commit(self) -> None:
        """Close the file and copy it to the URI atomically (without rows: an empty table)."""
        self._writer.close()
        storage.put_file(self.local_path, self.uri)


def write_sorted_run(rows: list[dict[str, Any]], path: str, schema: pa.Schema) -> None:
    """Write rows already sorted by ``reject_order`` as one local run file."""
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def merge_sorted_runs(paths: list[str], output: ParquetStream) -> None:
    """Merge run files, each sorted by ``reject_order``, into one sorted stream of rows."""
    merged = heapq.merge(*(_iter_rows(path) for path in paths), key=reject_order)
    chunk: list[dict[str, Any]] = []
    for row in merged:
        chunk.append(row)
        if len(chunk) >= MERGE_BATCH_ROWS:
            output.write_rows(chunk)
            chunk = []
    output.write_rows(chunk)


def _iter_rows(path: str) -> Iterator[dict[str, Any]]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=MERGE_BATCH_ROWS):
        yield from batch.to_pylist()


@dataclass
class OutputTally:
    """Counts and size statistics of curation's outputs, accumulated bucket by bucket."""

    accepted: int = 0
    train: int = 0
    val: int = 0
    labelled: int = 0
    rejected: int = 0
    sampled_out: int = 0
    over_limit: int = 0
    manifest_bytes: int = 0
    annotations: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    # value -> images: exact medians with memory bounded by the number of distinct sizes
    widths: Counter = field(default_factory=Counter)
    heights: Counter = field(default_factory=Counter)

    def add_manifest(self, rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> None:
        self.accepted += len(rows)
        for row, check in zip(rows, checks, strict=True):
            self.train += row["split"] == "train"
            self.val += row["split"] == "val"
            self.labelled += row["label"] is not None
            self.widths[row["width"]] += 1
            self.heights[row["height"]] += 1
            self.manifest_bytes += check["bytes"]
            self.annotations += check["annotations"] or 0

    def add_rejects(self, rows: list[dict[str, Any]]) -> None:
        self.rejected += len(rows)
        for row in rows:
            self.by_reason[row["reason"]] = self.by_reason.get(row["reason"], 0) + 1

    def counts(self, listed: int) -> dict[str, int]:
        counts = {
            "listed": listed,
            "accepted": self.accepted,
            "train": self.train,
            "val": self.val,
            "labelled": self.labelled,
            "rejected": self.rejected,
            "sampled_out": self.sampled_out,
            "over_limit": self.over_limit,
        }
        for reason, count in sorted(self.by_reason.items()):
            counts[f"rejected/{reason}"] = count
        return counts


def describe_histogram(histogram: Counter) -> dict[str, float] | None:
    """Return min, median and max of values counted in a histogram (value -> occurrences).

    The median follows ``numpy.median``: the mean of the two middle values of an even count.
    """
    total = sum(histogram.values())
    if total == 0:
        return None
    values = sorted(histogram)
    middle = ((total - 1) // 2, total // 2)  # 0-based positions of the middle values
    found: list[int] = []
    seen = 0
    for value in values:
        seen += histogram[value]
        while len(found) < 2 and middle[len(found)] < seen:
            found.append(value)
    return {"min": int(values[0]), "median": float(sum(found) / 2), "max": int(values[-1])}
