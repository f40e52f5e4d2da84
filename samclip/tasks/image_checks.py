"""The decode check that curation runs on every image, whatever layout the image came from.

One row per image file or archive member: its content hash and size, the decoded width and
height (after EXIF orientation), or the reason it was rejected. Layout-specific readers (plain
files, WebDataset shards, SA-1B) fill the optional columns: ``key``, ``caption`` and ``url``
from WebDataset metadata, and ``annotations`` (the number of SA-1B masks stored for the image).
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

from samclip.model.images import ImageRejected, decode_image

REASON_UNREADABLE = "unreadable"

CHECK_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("hash", pa.string()),
        ("bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("key", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("annotations", pa.int32()),
    ]
)


def check_image_bytes(uri: str, data: bytes, decode_limits: dict[str, Any]) -> dict[str, Any]:
    """Hash and decode-check one image's bytes; return its check row.

    ``decode_limits`` holds the keyword arguments of ``decode_image``: ``max_pixels``,
    ``min_side`` and ``max_aspect``.
    """
    row = empty_row(uri)
    row["hash"] = hashlib.sha256(data).hexdigest()
    row["bytes"] = len(data)
    try:
        image = decode_image(data, **decode_limits)
    except ImageRejected as rejected:
        row["reason"], row["detail"] = rejected.reason, rejected.detail
    else:
        row["height"], row["width"] = (int(side) for side in image.shape[:2])
    return row


def unreadable_row(uri: str, error: BaseException, reason: str = REASON_UNREADABLE) -> dict[str, Any]:
    """Return the check row of a file that could not be read at all."""
    row = empty_row(uri)
    row["reason"], row["detail"] = reason, f"{type(error).__name__}: {error}"
    return row


def empty_row(uri: str) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name in CHECK_SCHEMA.names}
    row["uri"] = uri
    return row


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Build a CHECK_SCHEMA table; an empty list gives an empty table of the same schema."""
    return pa.Table.from_pylist(rows, schema=CHECK_SCHEMA)
