"""Bucketed selection of curation: the same choices as one in-memory sort of every check row."""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from samclip.tasks import curate_select
from samclip.tasks.curate_select import (
    CheckSpool,
    ParquetStream,
    describe_histogram,
    hash_fraction,
    merge_sorted_runs,
    select_bucket,
    uri_order,
    write_sorted_run,
)
from samclip.tasks.image_checks import rows_to_table
from samclip.tasks.storage import member_uri

REJECTS_SCHEMA = pa.schema([("uri", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


def _check_rows(count: int, seed: int) -> list[dict]:
    """Check rows of files and archive members with many duplicates and some rejects."""
    rng = random.Random(seed)
    contents = [hashlib.sha256(str(index).encode()).hexdigest() for index in range(count // 3)]
    rows = []
    for index in range(count):
        if index % 3 == 0:
            archive = f"/data/{rng.randrange(5):02d}.tar"
            uri = member_uri(archive, rng.randrange(10_000), 10, f"{index}.jpg")
        else:
            uri = f"/data/{rng.randrange(100_000):06d}-{index}.png"
        kind = rng.random()
        row = {"uri": uri, "hash": rng.choice(contents), "bytes": rng.randrange(100, 200),
               "width": rng.randrange(32, 64), "height": rng.randrange(32, 64), "reason": None,
               "detail": None, "key": None, "caption": None, "url": None, "annotations": None}
        if kind < 0.1:
            row.update(hash=None, bytes=None, width=None, height=None, reason="unreadable",
                       detail="FileNotFoundError: gone")
        elif kind < 0.2:
            row.update(width=None, height=None, reason="not_an_image", detail="text")
        rows.append(row)
    return rows


def _reference(rows: list[dict], sample_fraction: float) -> tuple[list[dict], list[dict]]:
    """Curation's choices made with every row in memory at once."""
    accepted = [row for row in rows if row["reason"] is None]
    rejects = [
        {"uri": row["uri"], "reason": row["reason"], "detail": row["detail"] or ""}
        for row in rows
        if row["reason"] is not None
    ]
    first: dict[str, dict] = {}
    for row in sorted(accepted, key=lambda row: uri_order(row["uri"])):
        first.setdefault(row["hash"], row)
    rejects += [
        {"uri": row["uri"], "reason": "duplicate",
         "detail": f"same bytes as {first[row['hash']]['uri']} (sha256 {row['hash'][:16]})"}
        for row in accepted
        if first[row["hash"]] is not row
    ]
    sampled = sorted(
        (row for row in first.values() if hash_fraction(row["hash"], 0, 8) < sample_fraction),
        key=lambda row: row["hash"],
    )
    return sampled, sorted(rejects, key=lambda row: (row["uri"], row["reason"]))


@pytest.mark.parametrize("prefix_digits", [1, 2])
def test_buckets_match_in_memory_selection(tmp_path, monkeypatch, prefix_digits):
    monkeypatch.setattr(curate_select, "SPOOL_ROWS", 50)  # flush many times
    monkeypatch.setattr(curate_select, "MERGE_BATCH_ROWS", 7)
    rows = _check_rows(900, seed=prefix_digits)
    spool = CheckSpool(str(tmp_path), prefix_digits=prefix_digits)
    for start in range(0, len(rows), 32):
        spool.add(rows_to_table(rows[start : start + 32]))
    assert any(name.startswith("bucket-") for name in os.listdir(tmp_path))  # spooled early
    spool.close()
    assert spool.rows == len(rows)
    assert spool.buckets()[-1] == curate_select.NO_HASH_BUCKET
    assert spool.buckets()[:-1] == sorted(spool.buckets()[:-1])

    kept, runs = [], []
    for bucket in spool.buckets():
        bucket_kept, bucket_rejects, _ = select_bucket(spool.read(bucket), 0.6)
        kept += bucket_kept
        if bucket_rejects:
            runs.append(str(tmp_path / f"run-{bucket}.parquet"))
            write_sorted_run(bucket_rejects, runs[-1], REJECTS_SCHEMA)
    output = str(tmp_path / "out" / "rejects.parquet")
    merged = ParquetStream(str(tmp_path / "merged.parquet"), output, REJECTS_SCHEMA)
    merge_sorted_runs(runs, merged)
    merged.commit()

    expected_kept, expected_rejects = _reference(rows, 0.6)
    assert [row["uri"] for row in kept] == [row["uri"] for row in expected_kept]
    assert pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist() == expected_rejects
    assert merged.rows == len(expected_rejects)
    assert sum(row["reason"] == "duplicate" for row in expected_rejects) > 100


def test_duplicate_keeps_first_uri_and_archive_position(tmp_path):
    digest = "ab" + "0" * 62
    rows = [
        {"uri": member_uri("/d/a.tar", 5000, 3, "late.jpg"), "hash": digest},
        {"uri": "/d/b.png", "hash": digest},
        {"uri": member_uri("/d/a.tar", 512, 3, "early.jpg"), "hash": digest},
    ]
    table = rows_to_table([{**row, "bytes": 3, "width": 40, "height": 40} for row in rows])
    kept, rejects, sampled_out = select_bucket(table, 1.0)
    assert [row["uri"] for row in kept] == [rows[2]["uri"]]
    assert [row["reason"] for row in rejects] == ["duplicate", "duplicate"]
    assert all(rows[2]["uri"] in row["detail"] for row in rejects)
    assert sampled_out == 0


@pytest.mark.parametrize("count", [1, 2, 7, 200])
def test_describe_histogram_matches_numpy(count):
    values = np.random.default_rng(count).integers(1, 20, count)
    described = describe_histogram(Counter(values.tolist()))
    assert described == {
        "min": int(values.min()),
        "median": float(np.median(values)),
        "max": int(values.max()),
    }
    assert describe_histogram(Counter()) is None
