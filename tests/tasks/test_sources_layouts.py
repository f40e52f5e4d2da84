"""Curation of WebDataset shards (img2dataset's layout) and of the SA-1B layout (JPEG + JSON)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from samclip.config import PipelineConfig
from samclip.model.rle import decode_mask, encode_mask
from samclip.tasks import storage
from samclip.tasks.curate import curate, list_source
from samclip.tasks.sources_sa1b import read_annotations
from samclip.tasks.sources_webdataset import sample_key


def _encode(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _config(root, source, **data) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {"storage": {"root": str(root)}, "data": {"source": str(source), **data}, "ray": {"num_cpus": 2}}
    )


@pytest.fixture()
def webdataset_folder(tmp_path):
    """Two img2dataset shards: one healthy with a Parquet sidecar, one cut off mid-member."""
    folder = tmp_path / "wds"
    folder.mkdir()
    good = _encode(64, 48, seed=0)
    members = [
        ("000000000.jpg", good),
        ("000000000.txt", b"a red square"),
        ("000000000.json", json.dumps({"url": "http://example.invalid/0.jpg", "key": "000000000"}).encode()),
        ("000000001.png", _encode(40, 40, seed=1, fmt="PNG")),
        ("000000001.json", json.dumps({"url": "http://example.invalid/1.png"}).encode()),
        ("000000002.jpg", b"<html>not an image</html>"),
        ("000000003.jpg", good),  # the same bytes as sample 0
    ]
    (folder / "00000.tar").write_bytes(_tar(members))
    sidecar = pa.table(
        {
            "key": ["000000000", "000000001", "000000002", "000000003", "000000004"],
            "caption": [None, "a noise square", None, None, None],
            "url": [f"http://example.invalid/{i}" for i in range(5)],
            "status": ["success"] * 4 + ["failed_to_download"],
        }
    )
    pq.write_table(sidecar, folder / "00000.parquet")
    (folder / "00000_stats.json").write_text("{}")

    kept = _encode(50, 50, seed=2)
    second = _tar([("000010000.jpg", kept), ("000010001.jpg", _encode(60, 60, seed=3))])
    # cut 100 bytes into the second member's data (one header, the first member, one header)
    cut = 512 + (len(kept) + 511) // 512 * 512 + 512 + 100
    (folder / "00001.tar").write_bytes(second[:cut])
    return folder, good


def test_sample_key_splits_at_first_dot():
    assert sample_key("000000001.jpg") == ("000000001", "jpg")
    assert sample_key("a/b/x.seg.PNG") == ("a/b/x", "seg.png")


def test_curate_webdataset_shards(ray_cluster, webdataset_folder, tmp_path):
    folder, good = webdataset_folder
    assert list_source(str(folder))[0] == "webdataset"
    result = curate(_config(tmp_path / "run", folder))
    assert result.layout == "webdataset"

    manifest = pq.read_table(result.manifest_uri).to_pylist()
    keys = {row["uri"].rsplit("member=", 1)[1]: row for row in manifest}
    assert sorted(keys) == ["000000000.jpg", "000000001.png", "000010000.jpg"]
    for name, row in keys.items():
        data = storage.read_bytes(row["uri"])  # one ranged read of the shard
        assert hashlib.sha256(data).hexdigest() == row["hash"]
    assert storage.read_bytes(keys["000000000.jpg"]["uri"]) == good
    assert (keys["000000001.png"]["width"], keys["000000001.png"]["height"]) == (40, 40)

    rejects = {row["uri"].rsplit("/", 1)[1]: row for row in pq.read_table(result.rejects_uri).to_pylist()}
    reasons = {name.rsplit("member=", 1)[-1]: row["reason"] for name, row in rejects.items()}
    assert reasons["000000002.jpg"] == "not_an_image"
    assert reasons["000000003.jpg"] == "duplicate"
    assert reasons["00001.tar"] == "corrupt_archive"

    captions = {row["key"]: row for row in pq.read_table(result.captions_uri).to_pylist()}
    assert captions["000000000"]["caption"] == "a red square"  # from the .txt member
    assert captions["000000001"]["caption"] == "a noise square"  # from the Parquet sidecar
    assert captions["000000001"]["url"] == "http://example.invalid/1.png"  # the .json member wins
    summary = json.loads((tmp_path / "run" / "curate" / "summary.json").read_text())
    assert summary["download_status"] == {"success": 4, "failed_to_download": 1}
    assert summary["layout"] == "webdataset"


def _sa1b_document(image_id: int, height: int, width: int, masks: list[np.ndarray]) -> dict:
    annotations = []
    for index, mask in enumerate(masks):
        rows, columns = np.nonzero(mask)
        annotations.append(
            {
                "id": index + 10 * image_id,
                "segmentation": encode_mask(mask),
                "bbox": [int(columns.min()), int(rows.min()), int(np.ptp(columns)) + 1, int(np.ptp(rows)) + 1],
                "area": int(mask.sum()),
                "point_coords": [[float(columns.mean()), float(rows.mean())]],
                "predicted_iou": 0.9,
                "stability_score": 0.95,
                "crop_box": [0, 0, width, height],
            }
        )
    return {
        "image": {"image_id": image_id, "width": width, "height": height, "file_name": f"sa_{image_id}.jpg"},
        "annotations": annotations,
    }


@pytest.fixture()
def sa1b_folder(tmp_path):
    folder = tmp_path / "sa1b"
    folder.mkdir()
    height, width = 48, 64
    first = np.zeros((height, width), dtype=bool)
    first[5:20, 10:30] = True
    second = np.zeros((height, width), dtype=bool)
    second[30:45, 40:60] = True
    (folder / "sa_1.jpg").write_bytes(_encode(width, height, seed=1))
    (folder / "sa_1.json").write_text(json.dumps(_sa1b_document(1, height, width, [first, second])))
    # masks of another size than the image
    (folder / "sa_2.jpg").write_bytes(_encode(width, height, seed=2))
    (folder / "sa_2.json").write_text(json.dumps(_sa1b_document(2, 32, 32, [np.ones((32, 32), bool)])))
    (folder / "sa_3.jpg").write_bytes(_encode(width, height, seed=3))
    (folder / "sa_3.json").write_text("{ not json")
    return folder, (first, second)


def test_curate_sa1b_masks_become_annotations(ray_cluster, sa1b_folder, tmp_path):
    folder, (first, second) = sa1b_folder
    assert list_source(str(folder))[0] == "sa1b"
    result = curate(_config(tmp_path / "run", folder))
    assert result.layout == "sa1b"

    manifest = pq.read_table(result.manifest_uri).to_pylist()
    assert [row["uri"].rsplit("/", 1)[1] for row in manifest] == ["sa_1.jpg"]
    rejects = {row["uri"].rsplit("/", 1)[1]: row for row in pq.read_table(result.rejects_uri).to_pylist()}
    assert rejects["sa_2.jpg"]["reason"] == "annotation_mismatch"
    assert "32x32" in rejects["sa_2.jpg"]["detail"]
    assert rejects["sa_3.jpg"]["reason"] == "annotation_invalid"

    table = read_annotations(result.annotations_uri, [manifest[0]["hash"]])
    assert table.num_rows == 2
    rows = table.to_pylist()
    assert [row["annotation_id"] for row in rows] == [10, 11]
    for row, mask in zip(rows, (first, second), strict=True):
        decoded = decode_mask({"size": [row["height"], row["width"]], "counts": row["counts"]})
        assert np.array_equal(decoded, mask)
        assert row["area"] == int(mask.sum())
        rows_, columns = np.nonzero(mask)
        assert row["bbox"] == [columns.min(), rows_.min(), np.ptp(columns) + 1, np.ptp(rows_) + 1]
        assert row["point"] is not None
    summary = json.loads((tmp_path / "run" / "curate" / "summary.json").read_text())
    assert summary["annotations"] == 2


def test_curate_sa1b_missing_json(ray_cluster, tmp_path):
    folder = tmp_path / "sa1b"
    folder.mkdir()
    (folder / "sa_7.jpg").write_bytes(_encode(40, 40, seed=7))
    assert list_source(str(folder))[0] == "images"  # auto: no JSON beside the JPEG
    result = curate(_config(tmp_path / "run", folder, layout="sa1b"))
    rejects = pq.read_table(result.rejects_uri).to_pylist()
    assert [row["reason"] for row in rejects] == ["annotation_missing"]


def test_curate_sa1b_tar_shards(ray_cluster, sa1b_folder, tmp_path):
    """SA-1B's own tar shards give the same manifest hashes and masks as the extracted files."""
    folder, _ = sa1b_folder
    shards = tmp_path / "sa1b-tar"
    shards.mkdir()
    members = [
        ("sa_1.json", (folder / "sa_1.json").read_bytes()),  # a JSON before its image
        ("sa_1.jpg", (folder / "sa_1.jpg").read_bytes()),
        ("sa_2.jpg", (folder / "sa_2.jpg").read_bytes()),
        ("sa_2.json", (folder / "sa_2.json").read_bytes()),
        ("sa_3.jpg", (folder / "sa_3.jpg").read_bytes()),
        ("sa_3.json", (folder / "sa_3.json").read_bytes()),
        ("sa_5.jpg", _encode(40, 40, seed=5)),  # no JSON in the shard
    ]
    (shards / "sa_000000.tar").write_bytes(_tar(members))
    # a second shard cut inside its last image: the pair before the damage is kept
    mask = np.zeros((40, 48), dtype=bool)
    mask[4:30, 8:20] = True
    late = _encode(48, 48, seed=7)
    damaged = _tar(
        [
            ("sa_6.jpg", _encode(48, 40, seed=6)),
            ("sa_6.json", json.dumps(_sa1b_document(6, 40, 48, [mask])).encode()),
            ("sa_7.jpg", late),
        ]
    )
    with tarfile.open(fileobj=io.BytesIO(damaged)) as archive:
        late_start = archive.getmember("sa_7.jpg").offset_data
    (shards / "sa_000001.tar").write_bytes(damaged[: late_start + len(late) // 2])
    assert list_source(str(shards))[0] == "sa1b"

    extracted = curate(_config(tmp_path / "extracted", folder))
    archived = curate(_config(tmp_path / "archived", shards))
    assert archived.layout == "sa1b"

    manifest = {row["uri"].rsplit("member=", 1)[1]: row for row in pq.read_table(archived.manifest_uri).to_pylist()}
    assert sorted(manifest) == ["sa_1.jpg", "sa_6.jpg"]
    for row in manifest.values():
        assert "sa_0000" in row["uri"]
        assert hashlib.sha256(storage.read_bytes(row["uri"])).hexdigest() == row["hash"]
    extracted_hashes = pq.read_table(extracted.manifest_uri).column("hash").to_pylist()
    assert extracted_hashes == [manifest["sa_1.jpg"]["hash"]]

    rejects = {
        row["uri"].rsplit("member=", 1)[-1].rsplit("/", 1)[-1]: row
        for row in pq.read_table(archived.rejects_uri).to_pylist()
    }
    assert rejects["sa_2.jpg"]["reason"] == "annotation_mismatch"
    assert rejects["sa_3.jpg"]["reason"] == "annotation_invalid"
    assert rejects["sa_5.jpg"]["reason"] == "annotation_missing"
    assert rejects["sa_000001.tar"]["reason"] == "corrupt_archive"
    assert "sa_7.jpg" not in manifest

    # the masks of sa_1 are the same rows as from the extracted layout
    from_tar = read_annotations(archived.annotations_uri, extracted_hashes)
    from_files = read_annotations(extracted.annotations_uri, extracted_hashes)
    assert from_tar.num_rows == 2
    assert from_tar.equals(from_files)
    sixth = read_annotations(archived.annotations_uri, [manifest["sa_6.jpg"]["hash"]]).to_pylist()
    assert len(sixth) == 1
    decoded = decode_mask({"size": [sixth[0]["height"], sixth[0]["width"]], "counts": sixth[0]["counts"]})
    assert np.array_equal(decoded, mask)
    summary = storage.read_json(archived.summary_uri)
    assert summary["annotations"] == 3
