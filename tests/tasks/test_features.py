"""Feature shards: bit-exact round trips, hash-only reads and layout validation."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from samclip.tasks import features
from samclip.tasks.features import FeatureLayout


def _hashes(count: int, offset: int = 0) -> list[str]:
    return [hashlib.sha256(str(offset + i).encode()).hexdigest() for i in range(count)]


def _write_zeros(folder, hashes: list[str], shape: tuple[int, ...], dtype: str) -> str:
    arrays = np.zeros((len(hashes), *shape), dtype=dtype)
    return features.write_feature_shard(str(folder), hashes, arrays, dtype)


def test_fp16_round_trip_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    arrays = (rng.standard_normal((5, 8, 4, 4)) * 100).astype(np.float16)
    arrays[0, 0, 0, 0] = np.nan
    arrays[1, 0, 0, 0] = np.inf
    arrays[2, 0, 0, 0] = np.float16(6e-8)  # a subnormal
    hashes = _hashes(5)

    features.write_feature_shard(str(tmp_path), hashes, arrays, "float16")
    restored = features.read_features(str(tmp_path))

    assert sorted(restored) == sorted(hashes)
    for index, key in enumerate(hashes):
        assert restored[key].dtype == np.float16
        assert restored[key].shape == (8, 4, 4)
        assert np.array_equal(restored[key].view(np.uint16), arrays[index].view(np.uint16))
    assert restored[hashes[0]].flags.writeable


def test_float32_round_trip(tmp_path):
    arrays = np.arange(12, dtype=np.float32).reshape(3, 4)
    hashes = _hashes(3)
    features.write_feature_shard(str(tmp_path), hashes, arrays, "float32")
    restored = features.read_features(str(tmp_path), hashes=[hashes[1]])
    assert list(restored) == [hashes[1]]
    assert np.array_equal(restored[hashes[1]], arrays[1])


def test_shard_format_readable_without_samclip(tmp_path):
    arrays = np.ones((2, 3), dtype=np.float16)
    uri = features.write_feature_shard(str(tmp_path), _hashes(2), arrays, "float16")
    table = pq.read_table(uri)
    assert table.column_names == ["hash", "embedding"]
    assert table.schema.metadata[b"dtype"] == b"float16"
    assert table.schema.metadata[b"shape"] == b"[3]"
    row = np.frombuffer(table.column("embedding")[0].as_py(), dtype="<f2")
    assert np.array_equal(row, arrays[0])


def test_shard_name_is_digest_of_sorted_hashes(tmp_path):
    hashes = _hashes(3)
    arrays = np.zeros((3, 2), dtype=np.float16)
    uri = features.write_feature_shard(str(tmp_path), hashes, arrays, "float16")
    expected = hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()
    assert uri.endswith(f"part-{expected}.parquet")
    reversed_uri = features.write_feature_shard(str(tmp_path), hashes[::-1], arrays, "float16")
    assert reversed_uri == uri


def test_read_hashes_skips_temporary_files(tmp_path):
    _write_zeros(tmp_path, _hashes(2), (2,), "float16")
    _write_zeros(tmp_path, _hashes(3, 10), (2,), "float16")
    (tmp_path / ".tmp-123-part-0.parquet").write_bytes(b"partial")
    (tmp_path / "teacher.json").write_text("{}")

    assert features.read_feature_hashes(str(tmp_path)) == set(_hashes(2)) | set(_hashes(3, 10))
    assert features.read_feature_hashes(str(tmp_path / "absent")) == set()


def test_shape_mismatch_names_shard(tmp_path):
    _write_zeros(tmp_path, _hashes(2), (4,), "float16")
    odd = _write_zeros(tmp_path, _hashes(1, 5), (8,), "float16")
    odd_name = odd.rsplit("/", 1)[-1]

    with pytest.raises(ValueError, match=odd_name):
        features.read_features(str(tmp_path), expected=FeatureLayout("float16", (4,)))
    with pytest.raises(ValueError, match=odd_name):
        features.read_feature_hashes(str(tmp_path), expected=FeatureLayout("float16", (4,)))


def test_dtype_mismatch_with_expected_names_shard(tmp_path):
    uri = _write_zeros(tmp_path, _hashes(2), (4,), "float32")
    with pytest.raises(ValueError, match=uri.rsplit("/", 1)[-1]):
        features.read_layout(str(tmp_path), expected=FeatureLayout("float16", (4,)))


def test_shards_disagreeing_without_expected(tmp_path):
    first = _write_zeros(tmp_path, _hashes(1), (4,), "float16")
    second = _write_zeros(tmp_path, _hashes(1, 9), (4,), "float32")
    # shards are listed in name order; the later one is reported against the first
    later = max(first, second).rsplit("/", 1)[-1]
    with pytest.raises(ValueError, match=later):
        features.read_features(str(tmp_path))


@pytest.mark.parametrize(
    ("arrays", "dtype", "shape", "message"),
    [
        (np.zeros((2, 4), np.float32), "float16", None, "cast with"),
        (np.zeros((2, 4), np.float16), "int8", None, "unsupported feature dtype"),
        (np.zeros((3, 4), np.float16), "float16", None, "2 hashes but 3 arrays"),
        (np.zeros((2, 4), np.float16), "float16", (5,), "expected \\(5,\\)"),
        (np.zeros(2, np.float16), "float16", None, "at least 2 dims"),
    ],
)
def test_write_rejects_invalid_rows(tmp_path, arrays, dtype, shape, message):
    with pytest.raises(ValueError, match=message):
        features.write_feature_shard(str(tmp_path), _hashes(2), arrays, dtype, shape)


def test_missing_requested_hash_raises(tmp_path):
    features.write_feature_shard(str(tmp_path), _hashes(2), np.zeros((2, 4), np.float16), "float16")
    with pytest.raises(KeyError, match="1 of 2 requested hashes"):
        features.read_features(str(tmp_path), hashes=[_hashes(1)[0], "f" * 64])
