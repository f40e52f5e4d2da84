"""The SA-1B layout: ``sa_{id}.jpg`` beside ``sa_{id}.json`` with the image's masks as COCO RLE.

Each JSON holds ``image`` (``image_id``, ``width``, ``height``, ``file_name``) and
``annotations``, each with ``id``, ``segmentation`` (``size`` [H, W] and compressed
``counts``), ``bbox`` (XYWH, pixels), ``area``, ``point_coords`` ([[x, y]], the point that
prompted the mask), ``predicted_iou`` and ``stability_score``.

SA-1B is distributed as tar shards ``sa_000000.tar`` ... ``sa_000999.tar``, each holding about
11k such pairs. Curation reads either form: the extracted files, or the shards themselves, each
read once front to back by one Ray Data task. An image inside a shard is addressed by a member
URI (``storage.member_uri``), so precompute and training read it with one ranged read and the
shards never have to be extracted.

Curation checks each image and its JSON together: the masks must have the decoded image's
size, or the image is rejected, because a mask that does not line up with its pixels would
teach SAM the wrong thing. The masks of accepted images go to Parquet parts under
``{root}/curate/annotations/``, one row per mask, keyed by the image hash. They are the box
and point prompts and the ground-truth masks for SAM distillation and evaluation.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tarfile
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from samclip.model.rle import string_to_counts
from samclip.tasks import storage
from samclip.tasks.image_checks import check_image_bytes, rows_to_table, unreadable_row
from samclip.tasks.sources_webdataset import REASON_CORRUPT_ARCHIVE, SHARD_SUFFIX, sample_key

IMAGE_SUFFIXES = (".jpg", ".jpeg")
SHARD_NAME = re.compile(r"sa_\d+\.tar")  # the names Meta gives SA-1B's shards
# Masks of one shard are committed in parts of about this many rows, so a task keeps at most
# one part in memory. A whole SA-1B shard has about 11k images x 100 masks.
MASK_ROWS_PER_PART = 20_000
REASON_ANNOTATION_MISSING = "annotation_missing"
REASON_ANNOTATION_INVALID = "annotation_invalid"
REASON_ANNOTATION_MISMATCH = "annotation_mismatch"

ANNOTATION_SCHEMA = pa.schema(
    [
        ("hash", pa.string()),  # sha256 of the image file, as in the manifest
        ("annotation_id", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("counts", pa.string()),  # compressed COCO RLE of the (height, width) mask
        ("bbox", pa.list_(pa.float32(), 4)),  # XYWH in pixels
        ("point", pa.list_(pa.float32(), 2)),  # (x, y) in pixels; null when the JSON has none
        ("area", pa.int64()),
        ("predicted_iou", pa.float32()),
        ("stability_score", pa.float32()),
    ]
)


def annotation_uri(image_uri: str) -> str:
    """Return the URI of an SA-1B image's JSON: the same name with ``.json``."""
    stem = image_uri.rsplit(".", 1)[0]
    return f"{stem}.json"


def is_sa1b_layout(files: list[str]) -> bool:
    """Tell whether a listing looks like SA-1B: JPEGs, each with a JSON of the same stem."""
    names = set(files)
    images = [uri for uri in files if uri.lower().endswith(IMAGE_SUFFIXES)]
    return bool(images) and all(annotation_uri(uri) in names for uri in images)


def is_sa1b_shard(uri: str) -> bool:
    """Tell whether a file is named like one of SA-1B's tar shards (``sa_000000.tar``)."""
    return SHARD_NAME.fullmatch(uri.rsplit("/", 1)[-1]) is not None


def check_sa1b_batch(
    batch: pa.Table,
    decode_limits: dict[str, Any],
    annotations_dir: str,
    endpoint_url: str | None = None,
) -> pa.Table:
    """Decode-check each image with its JSON and store the masks of the accepted ones (Ray Data UDF).

    A URI is an extracted image (its JSON beside it) or a tar shard of such pairs. The masks go
    to Parquet parts named by the digest of their image hashes, so a retried batch rewrites
    nothing. Returns one check row per image, with ``annotations`` set to the number of masks
    stored, and for a damaged shard one more row with reason ``corrupt_archive``.
    """
    storage.configure_endpoint(endpoint_url)
    rows: list[dict[str, Any]] = []
    masks: list[dict[str, Any]] = []
    for uri in batch.column("uri").to_pylist():
        if uri.endswith(SHARD_SUFFIX):
            rows.extend(_check_shard(uri, decode_limits, annotations_dir))
            continue
        try:
            data = storage.read_bytes(uri)
        except OSError as error:
            rows.append(unreadable_row(uri, error))
            continue
        row = check_image_bytes(uri, data, decode_limits)
        rows.append(row)
        if row["reason"] is not None:
            continue
        json_uri = annotation_uri(uri)
        try:
            document = storage.read_bytes(json_uri)
        except FileNotFoundError:
            row["reason"] = REASON_ANNOTATION_MISSING
            row["detail"] = f"{json_uri} not found"
            continue
        except OSError as error:
            row["reason"] = REASON_ANNOTATION_INVALID
            row["detail"] = f"{json_uri}: {type(error).__name__}: {error}"
            continue
        masks.extend(_attach_masks(row, document, json_uri))

    if masks:
        write_annotation_part(annotations_dir, masks)
    return rows_to_table(rows)


def _check_shard(
    shard: str, decode_limits: dict[str, Any], annotations_dir: str
) -> list[dict[str, Any]]:
    """Check every image of one SA-1B tar shard against the JSON of the same key in the shard.

    The shard is streamed once. An accepted image waits for its JSON as a small check row, and
    a JSON that comes first waits as bytes, so only unmatched documents are kept in memory.
    """
    rows: list[dict[str, Any]] = []
    masks: list[dict[str, Any]] = []
    waiting_rows: dict[str, dict[str, Any]] = {}  # key -> accepted row without its JSON yet
    waiting_documents: dict[str, tuple[bytes, str]] = {}  # key -> (JSON bytes, member URI)
    done: set[str] = set()

    fs, path = storage.filesystem(shard)
    try:
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as archive:
            # "r|" streams the shard once; each member's bytes must be read before the next.
            for member in archive:
                if not member.isfile():
                    continue
                key, extension = sample_key(member.name)
                if f".{extension}" not in IMAGE_SUFFIXES and extension != "json":
                    continue
                payload = archive.extractfile(member)
                data = payload.read() if payload is not None else b""
                uri = storage.member_uri(shard, member.offset_data, member.size, member.name)
                if extension == "json":
                    if key in waiting_rows:
                        masks.extend(_attach_masks(waiting_rows.pop(key), data, uri))
                        done.add(key)
                    elif key not in done:
                        waiting_documents[key] = (data, uri)
                else:
                    row = check_image_bytes(uri, data, decode_limits)
                    rows.append(row)
                    if row["reason"] is not None:
                        waiting_documents.pop(key, None)
                        done.add(key)
                    elif key in waiting_documents:
                        masks.extend(_attach_masks(row, *waiting_documents.pop(key)))
                        done.add(key)
                    else:
                        waiting_rows[key] = row
                if len(masks) >= MASK_ROWS_PER_PART:
                    write_annotation_part(annotations_dir, masks)
                    masks = []
    except (tarfile.TarError, EOFError, OSError) as error:
        rows.append(unreadable_row(shard, error, REASON_CORRUPT_ARCHIVE))

    for key, row in waiting_rows.items():
        row["reason"] = REASON_ANNOTATION_MISSING
        row["detail"] = f"{key}.json not found in {shard}"
    if masks:
        write_annotation_part(annotations_dir, masks)
    return rows


def _attach_masks(row: dict[str, Any], document: bytes, source: str) -> list[dict[str, Any]]:
    """Parse an accepted image's JSON into mask rows and count them on its check row.

    On an invalid or mismatched document the row gets that reason instead, and no masks are
    returned. ``source`` names the JSON in the detail.
    """
    try:
        parsed = json.loads(document)
    except ValueError as error:
        row["reason"] = REASON_ANNOTATION_INVALID
        row["detail"] = f"{source}: {type(error).__name__}: {error}"
        return []
    try:
        masks = parse_annotations(parsed, row["hash"], row["height"], row["width"])
    except _AnnotationError as error:
        row["reason"], row["detail"] = error.reason, f"{source}: {error.detail}"
        return []
    row["annotations"] = len(masks)
    return masks


class _AnnotationError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_annotations(
    document: dict[str, Any], image_hash: str, height: int, width: int
) -> list[dict[str, Any]]:
    """Turn one SA-1B JSON document into ANNOTATION_SCHEMA rows for an image of (height, width).

    Raises _AnnotationError (reason ``annotation_mismatch``) when the JSON's image or a mask
    has another size than the decoded image, and (reason ``annotation_invalid``) when a mask's
    RLE does not decode to its stated size or a field is malformed.
    """
    info = document.get("image", {}) if isinstance(document, dict) else {}
    annotations = document.get("annotations") if isinstance(document, dict) else None
    if not isinstance(annotations, list):
        raise _AnnotationError(REASON_ANNOTATION_INVALID, "no 'annotations' list")
    stated = (info.get("height"), info.get("width"))
    if None not in stated and tuple(stated) != (height, width):
        raise _AnnotationError(
            REASON_ANNOTATION_MISMATCH,
            f"the JSON describes a {stated[1]}x{stated[0]} image, the decoded image is "
            f"{width}x{height}",
        )

    rows = []
    for index, annotation in enumerate(annotations):
        try:
            rows.append(_annotation_row(annotation, image_hash, height, width))
        except _AnnotationError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise _AnnotationError(
                REASON_ANNOTATION_INVALID, f"annotation {index}: {type(error).__name__}: {error}"
            ) from error
    return rows


def _annotation_row(
    annotation: dict[str, Any], image_hash: str, height: int, width: int
) -> dict[str, Any]:
    segmentation = annotation["segmentation"]
    mask_height, mask_width = (int(side) for side in segmentation["size"])
    if (mask_height, mask_width) != (height, width):
        raise _AnnotationError(
            REASON_ANNOTATION_MISMATCH,
            f"annotation {annotation.get('id')} has a {mask_width}x{mask_height} mask, the image "
            f"is {width}x{height}",
        )
    counts = segmentation["counts"]
    if not isinstance(counts, str):
        # An uncompressed list of counts: store it compressed like SA-1B's own masks.
        from samclip.model.rle import counts_to_string

        counts = counts_to_string([int(count) for count in counts])
    runs = string_to_counts(counts)
    if sum(runs) != height * width or min(runs, default=0) < 0:
        raise ValueError(f"RLE covers {sum(runs)} pixels, the image has {height * width}")
    area = int(sum(runs[1::2]))

    bbox = [float(value) for value in annotation["bbox"]]
    if len(bbox) != 4 or not all(math.isfinite(value) for value in bbox):
        raise ValueError(f"bbox must be 4 finite numbers XYWH, got {annotation['bbox']}")
    points = annotation.get("point_coords") or []
    point = [float(value) for value in points[0]] if points else None
    if point is not None and len(point) != 2:
        raise ValueError(f"point_coords must be [[x, y], ...], got {points}")
    return {
        "hash": image_hash,
        "annotation_id": int(annotation.get("id", -1)),
        "height": height,
        "width": width,
        "counts": counts,
        "bbox": bbox,
        "point": point,
        "area": int(annotation.get("area", area)),
        "predicted_iou": _optional_float(annotation.get("predicted_iou")),
        "stability_score": _optional_float(annotation.get("stability_score")),
    }


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def write_annotation_part(annotations_dir: str, rows: list[dict[str, Any]]) -> str:
    """Commit masks as one Parquet part named by the digest of its sorted image hashes."""
    hashes = sorted({row["hash"] for row in rows})
    digest = hashlib.sha256("\n".join(hashes).encode()).hexdigest()
    uri = storage.join(annotations_dir, f"part-{digest}.parquet")
    if not storage.exists(uri):
        storage.write_parquet(pa.Table.from_pylist(rows, schema=ANNOTATION_SCHEMA), uri)
    return uri


def read_annotations(annotations_dir: str, hashes: Iterable[str] | None = None) -> pa.Table:
    """Read the masks of the given image hashes (all when None), one row per (hash, id).

    Parts from earlier curation runs may repeat rows; each (hash, annotation_id) is returned
    once, sorted by hash then id.
    """
    wanted = None if hashes is None else set(hashes)
    tables = []
    for uri in storage.list_files(annotations_dir, suffix=".parquet"):
        table = storage.read_parquet(uri)
        if wanted is not None:
            keep = np.isin(np.asarray(table.column("hash").to_pylist(), dtype=object), list(wanted))
            table = table.filter(pa.array(keep))
        tables.append(table)
    if not tables:
        return ANNOTATION_SCHEMA.empty_table()
    table = pa.concat_tables(tables).cast(ANNOTATION_SCHEMA)
    table = table.sort_by([("hash", "ascending"), ("annotation_id", "ascending")])
    keys = list(zip(table.column("hash").to_pylist(), table.column("annotation_id").to_pylist()))
    first = [index == 0 or keys[index] != keys[index - 1] for index in range(len(keys))]
    return table.filter(pa.array(first))
