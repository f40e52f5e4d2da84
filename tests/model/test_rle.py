"""COCO RLE in numpy: round trips, the compressed string form, and invalid inputs."""

from __future__ import annotations

import numpy as np
import pytest

from samclip.model import rle


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    blob = np.zeros((37, 53), dtype=bool)
    blob[5:20, 10:40] = True
    return [
        np.zeros((4, 6), dtype=bool),
        np.ones((4, 6), dtype=bool),
        blob,
        rng.random((64, 48)) < 0.5,  # many short runs: differences go negative
        rng.random((300, 2)) < 0.01,  # long runs: counts need several 5-bit groups
    ]


@pytest.mark.parametrize("index", range(5))
def test_rle_round_trip(index):
    mask = _masks()[index]
    encoded = rle.encode_mask(mask)
    assert encoded["size"] == list(mask.shape)
    assert isinstance(encoded["counts"], str)
    decoded = rle.decode_mask(encoded)
    assert decoded.dtype == bool
    assert np.array_equal(decoded, mask)


def test_rle_counts_are_column_major():
    mask = np.array([[0, 1], [0, 1]], dtype=bool)
    # column-major: 0, 0 (first column), 1, 1 (second column)
    assert rle.mask_to_counts(mask) == [2, 2]
    assert rle.mask_to_counts(np.array([[1, 0], [0, 0]], dtype=bool)) == [0, 1, 3]


def test_rle_string_matches_reference_values():
    # Worked out by hand from maskApi.c's rleToString. The first three counts are stored as
    # they are: 2 -> "2", 2 -> "2", 40 = 0b1_01000 -> group 8 with the continuation bit
    # (8 + 32 + 48 = "X"), then group 1 ("1").
    assert rle.counts_to_string([2, 2, 40]) == "22X1"
    assert rle.string_to_counts("22X1") == [2, 2, 40]
    # from the fourth count on, the difference to the count two places earlier is stored:
    # 5 - 5 = 0 -> "0", and 1 - 5 = -4 is the single group 28 with the sign bit -> "L"
    assert rle.counts_to_string([3, 5, 1, 5]) == "3510"
    assert rle.string_to_counts(rle.counts_to_string([3, 5, 7, 1])) == [3, 5, 7, 1]
    assert rle.counts_to_string([3, 5, 7, 1])[-1] == "L"


def test_rle_uncompressed_counts():
    mask = _masks()[2]
    counts = rle.mask_to_counts(mask)
    assert np.array_equal(rle.decode_mask({"size": list(mask.shape), "counts": counts}), mask)


def test_rle_invalid_inputs():
    with pytest.raises(ValueError, match="add up to"):
        rle.decode_mask({"size": [2, 2], "counts": [1, 1]})
    with pytest.raises(ValueError, match="ends in the middle"):
        rle.string_to_counts("V")
    with pytest.raises(ValueError, match="invalid character"):
        rle.string_to_counts("2 2")
    with pytest.raises(ValueError, match="'size'"):
        rle.decode_mask({"counts": "22"})


def test_mask_bbox():
    mask = _masks()[2]
    assert rle.mask_bbox(mask) == (10.0, 5.0, 30.0, 15.0)
    assert rle.mask_bbox(np.zeros((3, 3), dtype=bool)) == (0.0, 0.0, 0.0, 0.0)
