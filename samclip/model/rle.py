"""COCO run-length encoding (RLE) of binary masks, in numpy: the format of SA-1B's masks.

A mask of shape (H, W) is flattened in column-major (Fortran) order and written as the lengths
of alternating runs, starting with a run of zeros (which may have length 0). The compressed
form, which SA-1B's JSON files use, stores these counts as an ASCII string. From the fourth
count on, each is replaced by its difference to the count two places earlier. Each value is
then written in 5-bit groups, least significant first, as ``chr(48 + group)``. Bit 0x20 marks
that another group follows, and bit 0x10 of the last group is the sign. This follows
``rleToString`` and ``rleFrString`` in pycocotools' ``maskApi.c``.
"""

from __future__ import annotations

import numpy as np

RLE_OFFSET = 48  # chr(48) = "0" encodes the group value 0


def mask_to_counts(mask: np.ndarray) -> list[int]:
    """Return the uncompressed run lengths of a (H, W) mask, zeros first, column-major."""
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return [0]
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts.insert(0, 0)  # the first run counts zeros, here none
    return counts


def counts_to_mask(counts: list[int] | np.ndarray, height: int, width: int) -> np.ndarray:
    """Rebuild a (H, W) bool mask from uncompressed run lengths.

    Raises ValueError when the counts do not add up to H * W or one is negative.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size and counts.min() < 0:
        raise ValueError(f"RLE counts must be >= 0, got {int(counts.min())}")
    total = int(counts.sum())
    if total != height * width:
        raise ValueError(
            f"RLE counts add up to {total} pixels, but the size {height}x{width} has "
            f"{height * width}"
        )
    values = np.arange(counts.size) % 2 == 1  # runs alternate: zeros, ones, zeros, ...
    flat = np.repeat(values, counts)
    return flat.reshape(width, height).T  # column-major: (W, H) rows are the image's columns


def counts_to_string(counts: list[int]) -> str:
    """Compress run lengths into COCO's ASCII form (``rleToString``)."""
    chars: list[str] = []
    for index, count in enumerate(counts):
        value = int(count)
        if index > 2:
            value -= int(counts[index - 2])
        more = True
        while more:
            group = value & 0x1F
            value >>= 5  # arithmetic shift: negative values end at -1
            more = value != -1 if group & 0x10 else value != 0
            if more:
                group |= 0x20
            chars.append(chr(group + RLE_OFFSET))
    return "".join(chars)


def string_to_counts(text: str | bytes) -> list[int]:
    """Expand COCO's compressed ASCII form into run lengths (``rleFrString``).

    Raises ValueError on a character outside the encoding or a string that ends mid-number.
    """
    if isinstance(text, bytes):
        text = text.decode("ascii")
    counts: list[int] = []
    position = 0
    while position < len(text):
        value = 0
        shift = 0
        more = True
        while more:
            if position >= len(text):
                raise ValueError("compressed RLE string ends in the middle of a count")
            group = ord(text[position]) - RLE_OFFSET
            if not 0 <= group < 64:
                raise ValueError(
                    f"invalid character {text[position]!r} at {position} in a compressed RLE"
                )
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def encode_mask(mask: np.ndarray) -> dict[str, object]:
    """Encode a (H, W) mask as a compressed COCO RLE: ``{"size": [H, W], "counts": str}``."""
    height, width = mask.shape
    return {"size": [int(height), int(width)], "counts": counts_to_string(mask_to_counts(mask))}


def decode_mask(rle: dict[str, object]) -> np.ndarray:
    """Decode a COCO RLE (compressed string or uncompressed list of counts) to a (H, W) bool mask."""
    try:
        height, width = (int(side) for side in rle["size"])  # type: ignore[union-attr]
        raw = rle["counts"]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"an RLE needs 'size' [H, W] and 'counts'; got keys {sorted(rle)}"
        ) from error
    counts = string_to_counts(raw) if isinstance(raw, (str, bytes)) else list(raw)  # type: ignore[arg-type]
    return counts_to_mask(counts, height, width)


def mask_bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Return the XYWH box of a mask's true pixels, in pixels; (0, 0, 0, 0) for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return (0.0, 0.0, 0.0, 0.0)
    x0, x1 = int(columns[0]), int(columns[-1]) + 1
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    return (float(x0), float(y0), float(x1 - x0), float(y1 - y0))
