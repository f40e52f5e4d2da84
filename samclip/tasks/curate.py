"""Curate an image set: decode-check, hash, de-duplicate, sample and split.

Ray Data reads and decode-checks every listed file in parallel, through the same
``decode_image`` that precompute, training and evaluation use, so an image that passes here
decodes everywhere. The driver then makes every choice from content hashes only, so a rerun
over the same files gives the same manifest whatever order the store lists them in:

- duplicates: of files with equal bytes the lexicographically first URI stays (members of one
  shard in their order in the shard);
- sample: a file is kept when ``int(hash[:8], 16) / 2**32 < sample_fraction``;
- split: a kept file is ``val`` when ``int(hash[8:16], 16) / 2**32 < val_fraction``, so the
  split does not depend on the sample;
- limit: the kept files with the smallest hashes, which are a prefix of the sample order.

Outputs under ``{root}/curate/``: ``manifest.parquet`` (hash, uri, width, height, split,
label, source), ``rejects.parquet`` (uri, reason, detail) and ``summary.json``. A WebDataset
source adds ``captions.parquet`` (hash, key, caption, url); an SA-1B source adds the masks of
the accepted images under ``annotations/`` (see ``samclip.tasks.sources_sa1b``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from samclip.config import DataConfig, PipelineConfig
from samclip.tasks import sources_sa1b, sources_webdataset, storage
from samclip.tasks.image_checks import (
    CHECK_SCHEMA,
    REASON_UNREADABLE,
    check_image_bytes,
    rows_to_table,
    unreadable_row,
)
from samclip.tasks.ray_cluster import init_ray
from samclip.tasks.sources import BUILTIN_SOURCE, materialise_builtin_photos

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CHECK_BATCH_SIZE = 32  # files per Ray Data batch; decoding dominates, so batches stay small
MAX_BLOCKS = 1000
PROGRESS_EVERY_S = 10.0
REASON_DUPLICATE = "duplicate"
SHARDS_PER_BATCH = 1  # WebDataset shards per Ray Data batch; a shard holds thousands of images

MANIFEST_SCHEMA = pa.schema(
    [
        ("hash", pa.string()),
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("split", pa.string()),
        ("label", pa.string()),
        ("source", pa.string()),
    ]
)
REJECTS_SCHEMA = pa.schema([("uri", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
CAPTIONS_SCHEMA = pa.schema(
    [("hash", pa.string()), ("key", pa.string()), ("caption", pa.string()), ("url", pa.string())]
)


@dataclass
class CurateResult:
    """Locations of the curation tables, and the counts that the summary also records."""

    manifest_uri: str
    rejects_uri: str
    summary_uri: str
    counts: dict[str, int] = field(default_factory=dict)
    layout: str = "images"
    captions_uri: str | None = None  # WebDataset sources only
    annotations_uri: str | None = None  # SA-1B sources only: the folder of mask parts


def curate(config: PipelineConfig) -> CurateResult:
    """List, check, de-duplicate, sample and split the configured images; write the tables."""
    data = config.data
    started = time.perf_counter()
    storage.configure_endpoint(config.storage.endpoint_url)

    # list the source
    layout = data.layout
    download_status: dict[str, int] = {}
    if data.source == BUILTIN_SOURCE:
        layout = "images"
        photos = materialise_builtin_photos(
            config.uri("data", "photos"), data.augment_crops, config.seed
        )
        # Local paths become absolute, so the manifest does not depend on the working folder.
        labels = {storage.local_path(uri) or uri: label for uri, label in photos}
        uris = list(labels)
        label_base = config.uri("data", "photos")
    else:
        layout, uris, skipped = list_source(data.source, data.layout)
        logger.info(
            "listed %d %s under %s (layout %s; %d other files skipped)",
            len(uris), "shards" if layout == "webdataset" else "images", data.source, layout,
            skipped,
        )
        if layout == "webdataset":
            download_status = sources_webdataset.download_status_counts(uris)
        labels = {}
        label_base = data.source
    if not uris:
        raise ValueError(
            f"no images found under {data.source!r} (extensions {', '.join(IMAGE_EXTENSIONS)}, "
            f"or .tar shards); set data.source to a folder or prefix that contains images"
        )

    # decode-check every file (or every member of every shard) with Ray Data
    init_ray(config.ray)
    annotations_dir = config.uri("curate", "annotations") if layout == "sa1b" else None
    checked = _check_images(uris, data, config.storage.endpoint_url, layout, annotations_dir)
    if data.labels:
        labels.update(
            _label_lookup([row["uri"] for row in checked], read_labels(data.labels), label_base)
        )

    # decide on the driver, from hashes only
    accepted, rejects = _split_rejects(checked)
    unique, duplicates = _deduplicate(accepted)
    rejects.extend(duplicates)
    sampled = [row for row in unique if _fraction(row["hash"], 0, 8) < data.sample_fraction]
    sampled.sort(key=lambda row: row["hash"])
    limited = sampled[: data.limit] if data.limit is not None else sampled

    manifest_rows = [
        {
            "hash": row["hash"],
            "uri": row["uri"],
            "width": row["width"],
            "height": row["height"],
            "split": "val" if _fraction(row["hash"], 8, 16) < data.val_fraction else "train",
            "label": labels.get(row["uri"]),
            "source": data.source,
        }
        for row in limited
    ]
    rejects.sort(key=lambda row: (row["uri"], row["reason"]))

    # write the outputs
    seconds = time.perf_counter() - started
    sampled_out = len(unique) - len(sampled)
    listed = len(checked)  # image files, or image members of shards plus unreadable shards
    counts = _counts(listed, manifest_rows, rejects, sampled_out, len(sampled) - len(limited))
    summary = _summary(config, counts, manifest_rows, limited, seconds)
    summary["layout"] = layout
    if download_status:
        summary["download_status"] = download_status
    result = CurateResult(
        manifest_uri=config.uri("curate", "manifest.parquet"),
        rejects_uri=config.uri("curate", "rejects.parquet"),
        summary_uri=config.uri("curate", "summary.json"),
        counts=counts,
        layout=layout,
        annotations_uri=annotations_dir,
    )
    if layout == "webdataset":
        result.captions_uri = config.uri("curate", "captions.parquet")
        captions = [
            {"hash": row["hash"], "key": row["key"], "caption": row["caption"], "url": row["url"]}
            for row in limited
        ]
        storage.write_parquet(
            pa.Table.from_pylist(captions, schema=CAPTIONS_SCHEMA), result.captions_uri
        )
    if annotations_dir is not None:
        summary["annotations"] = int(sum(row["annotations"] or 0 for row in limited))
    manifest = pa.Table.from_pylist(manifest_rows, schema=MANIFEST_SCHEMA)
    storage.write_parquet(manifest, result.manifest_uri)
    storage.write_parquet(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), result.rejects_uri)
    storage.write_json(result.summary_uri, summary)
    logger.info(
        "curated %d images (%d train, %d val), %d rejected, in %.1f s; manifest %s",
        counts["accepted"], counts["train"], counts["val"], counts["rejected"], seconds,
        result.manifest_uri,
    )
    return result


def list_images(source: str) -> tuple[list[str], int]:
    """List image files under a folder or prefix, recursively; returns (uris, other files)."""
    files = storage.list_files(source)
    images = [uri for uri in files if uri.lower().endswith(IMAGE_EXTENSIONS)]
    return images, len(files) - len(images)


def list_source(source: str, layout: str = "auto") -> tuple[str, list[str], int]:
    """List what curation checks under a source: (layout, URIs, other files skipped).

    The URIs are image files for the ``images`` and ``sa1b`` layouts, and tar shards for
    ``webdataset``. ``auto`` picks webdataset when the source holds .tar files, sa1b when every
    JPEG has a JSON of the same name beside it, and images otherwise.
    """
    files = storage.list_files(source)
    shards = [uri for uri in files if uri.endswith(sources_webdataset.SHARD_SUFFIX)]
    if layout == "auto":
        if shards:
            layout = "webdataset"
        elif sources_sa1b.is_sa1b_layout(files):
            layout = "sa1b"
        else:
            layout = "images"
    if layout == "webdataset":
        return layout, shards, len(files) - len(shards)
    images = [uri for uri in files if uri.lower().endswith(IMAGE_EXTENSIONS)]
    return layout, images, len(files) - len(images)


def read_labels(uri: str) -> dict[str, str]:
    """Read a labels table (CSV or Parquet) with a ``label`` column and a key column.

    The key column is the first of ``uri``, ``file``, ``path`` or ``name``. A key is matched
    against a full URI, then a path relative to the source, then a file name.
    """
    if uri.endswith(".parquet"):
        rows = storage.read_parquet(uri).to_pylist()
    else:
        rows = list(csv.DictReader(io.StringIO(storage.read_bytes(uri).decode("utf-8-sig"))))
    columns = set(rows[0]) if rows else set()
    key = next((name for name in ("uri", "file", "path", "name") if name in columns), None)
    if key is None or "label" not in columns:
        raise ValueError(
            f"labels table {uri} has columns {sorted(columns)}; expected 'label' and one of "
            "'uri', 'file', 'path' or 'name'"
        )
    return {str(row[key]): str(row["label"]) for row in rows if row.get("label") not in (None, "")}


def _label_lookup(uris: list[str], table: dict[str, str], base: str) -> dict[str, str]:
    base_path = storage.filesystem(base)[1].rstrip("/") + "/"
    found = {}
    for uri in uris:
        path = storage.filesystem(uri)[1]
        relative = path[len(base_path) :] if path.startswith(base_path) else None
        for key in (uri, path, relative, os.path.basename(path)):
            if key is not None and key in table:
                found[uri] = table[key]
                break
    logger.info("labels: %d of %d images matched", len(found), len(uris))
    return found


def check_batch(
    batch: pa.Table,
    max_pixels: int,
    min_side: int,
    max_aspect: float,
    endpoint_url: str | None = None,
) -> pa.Table:
    """Read, hash and decode-check each URI of a batch; one row per file (Ray Data UDF)."""
    storage.configure_endpoint(endpoint_url)
    limits = {"max_pixels": max_pixels, "min_side": min_side, "max_aspect": max_aspect}
    rows: list[dict[str, Any]] = []
    for uri in batch.column("uri").to_pylist():
        try:
            data = storage.read_bytes(uri)
        except OSError as error:
            rows.append(unreadable_row(uri, error, REASON_UNREADABLE))
        else:
            rows.append(check_image_bytes(uri, data, limits))
    return rows_to_table(rows)


def _check_images(
    uris: list[str],
    data: DataConfig,
    endpoint_url: str | None,
    layout: str = "images",
    annotations_dir: str | None = None,
) -> list[dict[str, Any]]:
    import ray

    limits = {"max_pixels": data.max_pixels, "min_side": data.min_side, "max_aspect": data.max_aspect}
    per_batch = SHARDS_PER_BATCH if layout == "webdataset" else CHECK_BATCH_SIZE
    blocks = max(1, min(MAX_BLOCKS, math.ceil(len(uris) / per_batch)))
    dataset = ray.data.from_items([{"uri": uri} for uri in uris], override_num_blocks=blocks)
    if layout == "webdataset":
        udf, kwargs = sources_webdataset.check_shard_batch, {
            "decode_limits": limits, "image_extensions": IMAGE_EXTENSIONS,
        }
    elif layout == "sa1b":
        udf, kwargs = sources_sa1b.check_sa1b_batch, {
            "decode_limits": limits, "annotations_dir": annotations_dir,
        }
    else:
        udf, kwargs = check_batch, dict(limits)
    dataset = dataset.map_batches(
        udf,
        batch_format="pyarrow",
        batch_size=per_batch,
        fn_kwargs={**kwargs, "endpoint_url": endpoint_url},
        **storage.ray_remote_args(),
    )

    started = last_log = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        rows.extend(batch.to_pylist())
        now = time.perf_counter()
        if now - last_log >= PROGRESS_EVERY_S:
            last_log = now
            logger.info(
                "checked %d/%d images (%.1f images/s)",
                len(rows), len(uris), len(rows) / (now - started),
            )
    elapsed = time.perf_counter() - started
    logger.info(
        "checked %d images in %.1f s (%.1f images/s)",
        len(rows), elapsed, len(rows) / max(elapsed, 1e-9),
    )
    if layout != "webdataset" and len(rows) != len(uris):
        raise RuntimeError(f"decode check returned {len(rows)} rows for {len(uris)} files")
    return rows


def _split_rejects(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    accepted, rejects = [], []
    for row in rows:
        if row["reason"] is None:
            accepted.append(row)
        else:
            detail = row["detail"] or ""
            rejects.append({"uri": row["uri"], "reason": row["reason"], "detail": detail})
    return accepted, rejects


def _deduplicate(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Keep the first URI of each hash (see ``_uri_order``); the others become rejects."""
    first: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda row: _uri_order(row["uri"])):
        first.setdefault(row["hash"], row)
    duplicates = [
        {
            "uri": row["uri"],
            "reason": REASON_DUPLICATE,
            "detail": f"same bytes as {first[row['hash']]['uri']} (sha256 {row['hash'][:16]})",
        }
        for row in rows
        if first[row["hash"]] is not row
    ]
    return list(first.values()), duplicates


def _uri_order(uri: str) -> tuple[str, int, str]:
    """Order files by URI, and members of one archive by their position in it."""
    member = storage.parse_member_uri(uri)
    if member is None:
        return (uri, 0, "")
    archive, offset, _, name = member
    return (archive, offset, name)


def _fraction(digest: str, start: int, stop: int) -> float:
    """Map a slice of hex digits of a hash to [0, 1)."""
    return int(digest[start:stop], 16) / 16 ** (stop - start)


def _counts(
    listed: int,
    manifest: list[dict[str, Any]],
    rejects: list[dict[str, Any]],
    sampled_out: int,
    over_limit: int,
) -> dict[str, int]:
    counts = {
        "listed": listed,
        "accepted": len(manifest),
        "train": sum(row["split"] == "train" for row in manifest),
        "val": sum(row["split"] == "val" for row in manifest),
        "labelled": sum(row["label"] is not None for row in manifest),
        "rejected": len(rejects),
        "sampled_out": sampled_out,
        "over_limit": over_limit,
    }
    for row in rejects:
        key = f"rejected/{row['reason']}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _summary(
    config: PipelineConfig,
    counts: dict[str, int],
    manifest: list[dict[str, Any]],
    manifest_checks: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    def describe(values: list[int]) -> dict[str, float] | None:
        if not values:
            return None
        return {
            "min": int(np.min(values)),
            "median": float(np.median(values)),
            "max": int(np.max(values)),
        }

    by_reason = {
        key.split("/", 1)[1]: value for key, value in counts.items() if key.startswith("rejected/")
    }
    return {
        "source": config.data.source,
        "counts": counts,
        "rejected_by_reason": by_reason,
        "manifest_bytes": int(sum(row["bytes"] for row in manifest_checks)),
        "width": describe([row["width"] for row in manifest]),
        "height": describe([row["height"] for row in manifest]),
        "seconds": round(seconds, 3),
        "data_config": config.data.model_dump(mode="json"),
    }
