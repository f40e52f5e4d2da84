"""Curate an image set: decode-check, hash, de-duplicate, sample and split.

Ray Data reads and decode-checks every listed file in parallel, through the same
``decode_image`` that precompute, training and evaluation use, so an image that passes here
decodes everywhere. The check rows stream to local files bucketed by hash prefix (see
``samclip.tasks.curate_select``), so the driver's memory does not grow with the number of
images. Every choice is made from content hashes only, so a rerun over the same files gives
the same manifest whatever order the store lists them in:

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
import io
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from samclip.config import DataConfig, PipelineConfig
from samclip.tasks import sources_sa1b, sources_webdataset, storage
from samclip.tasks.curate_select import (
    CheckSpool,
    ParquetStream,
    merge_sorted_runs,
    OutputTally,
    describe_histogram,
    select_bucket,
    write_sorted_run,
)
from samclip.tasks.curate_select import hash_fraction as _fraction
from samclip.tasks.image_checks import (
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
SHARDS_PER_BATCH = 1  # tar shards per Ray Data batch; a shard contains thousands of images

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
    storage.remove_stale_temp_files(config.uri("curate"), config.storage.stale_temp_age_s)

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
            len(uris), "shards" if layout == "webdataset" else "files", data.source, layout,
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

    # decode-check every file (or every member of every shard) with Ray Data, spooling the
    # check rows to local bucket files so that the driver never keeps them all in memory
    init_ray(config.ray)
    annotations_dir = config.uri("curate", "annotations") if layout == "sa1b" else None
    label_table = read_labels(data.labels) if data.labels else {}
    with tempfile.TemporaryDirectory(prefix="samclip-curate-") as staging:
        spool = CheckSpool(staging)
        _check_images(uris, data, config.storage.endpoint_url, layout, annotations_dir, spool)
        spool.close()

        # decide bucket by bucket, from hashes only, and write the outputs
        result = CurateResult(
            manifest_uri=config.uri("curate", "manifest.parquet"),
            rejects_uri=config.uri("curate", "rejects.parquet"),
            summary_uri=config.uri("curate", "summary.json"),
            layout=layout,
            annotations_uri=annotations_dir,
        )
        if layout == "webdataset":
            result.captions_uri = config.uri("curate", "captions.parquet")
        tally = _write_tables(config, spool, staging, result, labels, label_table, label_base)

    seconds = time.perf_counter() - started
    result.counts = tally.counts(listed=spool.rows)
    summary = _summary(config, result.counts, tally, seconds)
    summary["layout"] = layout
    if download_status:
        summary["download_status"] = download_status
    if annotations_dir is not None:
        summary["annotations"] = tally.annotations
    storage.write_json(result.summary_uri, summary)
    if label_table:
        logger.info("labels: %d of %d manifest images matched", tally.labelled, tally.accepted)
    logger.info(
        "curated %d images (%d train, %d val), %d rejected, in %.1f s; manifest %s",
        tally.accepted, tally.train, tally.val, tally.rejected, seconds, result.manifest_uri,
    )
    return result


def _write_tables(
    config: PipelineConfig,
    spool: CheckSpool,
    staging: str,
    result: CurateResult,
    labels: dict[str, str],
    label_table: dict[str, str],
    label_base: str,
) -> OutputTally:
    """Select each bucket's images and stream the manifest, captions and rejects to storage.

    Buckets come in hash-prefix order and each is sorted by hash, so ``data.limit`` keeps the
    smallest hashes of the whole sample, as one sort of every row would.
    """
    data = config.data
    tally = OutputTally()
    manifest = ParquetStream(
        os.path.join(staging, "manifest.parquet"), result.manifest_uri, MANIFEST_SCHEMA
    )
    captions = None
    if result.captions_uri is not None:
        captions = ParquetStream(
            os.path.join(staging, "captions.parquet"), result.captions_uri, CAPTIONS_SCHEMA
        )
    runs = []
    remaining = data.limit
    for bucket in spool.buckets():
        selected, rejects, sampled_out = select_bucket(spool.read(bucket), data.sample_fraction)
        tally.sampled_out += sampled_out
        if remaining is not None:
            tally.over_limit += max(0, len(selected) - remaining)
            selected = selected[:remaining]
            remaining -= len(selected)

        found = _label_lookup([row["uri"] for row in selected], label_table, label_base)
        rows = [
            {
                "hash": row["hash"],
                "uri": row["uri"],
                "width": row["width"],
                "height": row["height"],
                "split": "val" if _fraction(row["hash"], 8, 16) < data.val_fraction else "train",
                "label": found.get(row["uri"], labels.get(row["uri"])),
                "source": data.source,
            }
            for row in selected
        ]
        manifest.write_rows(rows)
        tally.add_manifest(rows, selected)
        if captions is not None:
            captions.write_rows(
                [{name: row[name] for name in CAPTIONS_SCHEMA.names} for row in selected]
            )
        if rejects:
            runs.append(os.path.join(staging, f"rejects-{bucket}.parquet"))
            write_sorted_run(rejects, runs[-1], REJECTS_SCHEMA)
            tally.add_rejects(rejects)

    # commit the tables
    if captions is not None:
        captions.commit()
    manifest.commit()
    rejected = ParquetStream(
        os.path.join(staging, "rejects.parquet"), result.rejects_uri, REJECTS_SCHEMA
    )
    merge_sorted_runs(runs, rejected)
    rejected.commit()
    return tally


def list_images(source: str) -> tuple[list[str], int]:
    """List image files under a folder or prefix, recursively; returns (uris, other files)."""
    files = storage.list_files(source)
    images = [uri for uri in files if uri.lower().endswith(IMAGE_EXTENSIONS)]
    return images, len(files) - len(images)


def list_source(source: str, layout: str = "auto") -> tuple[str, list[str], int]:
    """List what curation checks under a source: (layout, URIs, other files skipped).

    The URIs are image files for ``images``, tar shards for ``webdataset``, and both for
    ``sa1b`` (extracted images, and SA-1B's own tar shards). ``auto`` picks sa1b when every
    .tar file is named like an SA-1B shard (``sa_000000.tar``), webdataset when there are other
    .tar files, sa1b when every JPEG has a JSON of the same name beside it, and images
    otherwise.
    """
    files = storage.list_files(source)
    shards = [uri for uri in files if uri.endswith(sources_webdataset.SHARD_SUFFIX)]
    if layout == "auto":
        if shards:
            sa1b_shards = all(sources_sa1b.is_sa1b_shard(uri) for uri in shards)
            layout = "sa1b" if sa1b_shards else "webdataset"
        elif sources_sa1b.is_sa1b_layout(files):
            layout = "sa1b"
        else:
            layout = "images"
    if layout == "webdataset":
        return layout, shards, len(files) - len(shards)
    images = [uri for uri in files if uri.lower().endswith(IMAGE_EXTENSIONS)]
    if layout == "sa1b":
        images = sorted(images + shards)
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
    if not table:
        return {}
    base_path = storage.filesystem(base)[1].rstrip("/") + "/"
    found = {}
    for uri in uris:
        path = storage.filesystem(uri)[1]
        relative = path[len(base_path) :] if path.startswith(base_path) else None
        for key in (uri, path, relative, os.path.basename(path)):
            if key is not None and key in table:
                found[uri] = table[key]
                break
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
    layout: str,
    annotations_dir: str | None,
    spool: CheckSpool,
) -> None:
    """Decode-check every listed file or archive with Ray Data, adding check rows to ``spool``."""
    import ray

    limits = {"max_pixels": data.max_pixels, "min_side": data.min_side, "max_aspect": data.max_aspect}
    has_archives = any(uri.endswith(sources_webdataset.SHARD_SUFFIX) for uri in uris)
    per_batch = SHARDS_PER_BATCH if has_archives else CHECK_BATCH_SIZE
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
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        spool.add(batch)
        now = time.perf_counter()
        if now - last_log >= PROGRESS_EVERY_S:
            last_log = now
            logger.info(
                "checked %d images of %d listed %s (%.1f images/s)",
                spool.rows, len(uris), "files and archives" if has_archives else "files",
                spool.rows / (now - started),
            )
    elapsed = time.perf_counter() - started
    logger.info(
        "checked %d images in %.1f s (%.1f images/s)",
        spool.rows, elapsed, spool.rows / max(elapsed, 1e-9),
    )
    if not has_archives and spool.rows != len(uris):
        raise RuntimeError(f"decode check returned {spool.rows} rows for {len(uris)} files")


def _summary(
    config: PipelineConfig, counts: dict[str, int], tally: OutputTally, seconds: float
) -> dict[str, Any]:
    by_reason = {
        key.split("/", 1)[1]: value for key, value in counts.items() if key.startswith("rejected/")
    }
    return {
        "source": config.data.source,
        "counts": counts,
        "rejected_by_reason": by_reason,
        "manifest_bytes": tally.manifest_bytes,
        "width": describe_histogram(tally.widths),
        "height": describe_histogram(tally.heights),
        "seconds": round(seconds, 3),
        "data_config": config.data.model_dump(mode="json"),
    }
