"""Curation with Ray Data: decode checks, rejects, duplicates, splits, labels."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from samclip.config import PipelineConfig
from samclip.tasks import sources
from samclip.tasks.curate import curate
from samclip.tasks.storage import TMP_PREFIX

MANIFEST_COLUMNS = ["hash", "uri", "width", "height", "split", "label", "source"]


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _builtin(name: str) -> str:
    return dict((photo.file, path) for photo, path in sources.available_photos())[name]


@pytest.fixture()
def image_folder(tmp_path):
    """A folder with good photos, broken files, a duplicate and a nested folder."""
    folder = tmp_path / "images"
    (folder / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(_builtin("chelsea.png"), folder / "cat.png")
    shutil.copy(_builtin("coffee.png"), folder / "nested" / "coffee.png")
    shutil.copy(_builtin("rocket.jpg"), folder / "nested" / "deeper" / "rocket.JPG")
    shutil.copy(_builtin("chelsea.png"), folder / "nested" / "cat-copy.png")  # duplicate
    (folder / "noise.png").write_bytes(_png(64, 48, seed=1))
    (folder / "corrupt.jpg").write_bytes(b"this is not an image at all")
    (folder / "empty.png").write_bytes(b"")
    (folder / "tiny.png").write_bytes(_png(8, 8, seed=2))
    (folder / "wide.png").write_bytes(_png(400, 40, seed=3))
    rocket = (folder / "nested" / "deeper" / "rocket.JPG").read_bytes()
    (folder / "truncated.jpg").write_bytes(rocket[: len(rocket) // 2])
    (folder / "notes.txt").write_text("not listed: no image extension")
    return folder


def _config(root, source: str, **data) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {"storage": {"root": str(root)}, "data": {"source": source, **data}, "ray": {"num_cpus": 2}}
    )


def test_curate_folder_rejects_and_duplicates(ray_cluster, image_folder, tmp_path):
    config = _config(tmp_path / "run", str(image_folder), val_fraction=0.5)
    result = curate(config)

    manifest = pq.read_table(result.manifest_uri)
    assert manifest.column_names == MANIFEST_COLUMNS
    rows = {row["uri"].rsplit("images/", 1)[1]: row for row in manifest.to_pylist()}
    assert sorted(rows) == ["cat.png", "nested/coffee.png", "nested/deeper/rocket.JPG", "noise.png"]
    for name, row in rows.items():
        data = (image_folder / name).read_bytes()
        assert row["hash"] == hashlib.sha256(data).hexdigest()
        width, height = Image.open(io.BytesIO(data)).size
        assert (row["width"], row["height"]) == (width, height)
        expected_split = "val" if int(row["hash"][8:16], 16) / 2**32 < 0.5 else "train"
        assert row["split"] == expected_split
        assert row["source"] == str(image_folder)
        assert row["label"] is None

    reject_rows = pq.read_table(result.rejects_uri).to_pylist()
    rejects = {row["uri"].rsplit("images/", 1)[1]: row for row in reject_rows}
    assert rejects["corrupt.jpg"]["reason"] == "not_an_image"
    assert rejects["empty.png"]["reason"] == "empty"
    assert rejects["tiny.png"]["reason"] == "too_small"
    assert rejects["wide.png"]["reason"] == "bad_aspect"
    assert rejects["truncated.jpg"]["reason"] in ("truncated", "corrupt")
    assert rejects["nested/cat-copy.png"]["reason"] == "duplicate"
    assert "cat.png" in rejects["nested/cat-copy.png"]["detail"]
    assert "notes.txt" not in rejects

    assert result.counts["listed"] == 10
    assert result.counts["accepted"] == 4
    assert result.counts["rejected"] == 6
    assert result.counts["rejected/duplicate"] == 1
    summary = json.loads(open(result.summary_uri).read())
    assert summary["rejected_by_reason"]["empty"] == 1
    assert summary["counts"] == result.counts


def test_curate_is_deterministic(ray_cluster, image_folder, tmp_path):
    first = curate(_config(tmp_path / "a", str(image_folder)))
    # a temporary file that a killed curate left two hours ago; the next run removes it
    stale = tmp_path / "b" / "curate" / f"{TMP_PREFIX}{uuid.uuid4().hex}-manifest.parquet"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"PAR1 cut off")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    second = curate(_config(tmp_path / "b", str(image_folder)))
    assert pq.read_table(first.manifest_uri).equals(pq.read_table(second.manifest_uri))
    assert pq.read_table(first.rejects_uri).equals(pq.read_table(second.rejects_uri))
    assert not stale.exists()


def test_curate_sample_and_labels(ray_cluster, image_folder, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\ncat.png,cat\nnested/coffee.png,coffee cup\nrocket.JPG,rocket\n")
    config = _config(tmp_path / "run", str(image_folder), sample_fraction=0.5, labels=str(labels))
    result = curate(config)

    manifest = pq.read_table(result.manifest_uri).to_pylist()
    for row in manifest:
        assert int(row["hash"][:8], 16) / 2**32 < 0.5
    assert result.counts["accepted"] + result.counts["sampled_out"] == 4
    expected = {
        "cat.png": "cat",
        "coffee.png": "coffee cup",
        "rocket.JPG": "rocket",
        "noise.png": None,
    }
    for row in manifest:
        assert row["label"] == expected[row["uri"].rsplit("/", 1)[1]]


def test_curate_builtin_photos_with_limit(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = PipelineConfig.model_validate(
        {"storage": {"root": "run"}, "data": {"augment_crops": 1, "limit": 5}}
    )
    result = curate(config)

    manifest = pq.read_table(result.manifest_uri).to_pylist()
    assert len(manifest) == 5
    assert all(row["label"] for row in manifest)
    assert all(row["source"] == "builtin:photos" for row in manifest)
    assert all(os.path.isabs(row["uri"]) for row in manifest)
    assert [row["hash"] for row in manifest] == sorted(row["hash"] for row in manifest)
    total = 2 * len(sources.BUILTIN_PHOTOS)
    assert result.counts["listed"] == total
    assert result.counts["over_limit"] == total - 5 - result.counts["rejected"]
    assert (tmp_path / "run" / "data" / "photos" / "labels.csv").is_file()


def test_curate_empty_source_raises(ray_cluster, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        curate(_config(tmp_path / "run", str(tmp_path / "empty")))
