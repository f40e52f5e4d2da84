"""Every kind of bad or unusual input, through curate (and precompute for mixed sizes).

One curation run covers a folder holding one small file of each kind. The decode-level details
(pixel values after each conversion) are tested in tests/model/test_images.py; here each kind
must end up in the manifest with the decoded size, or in the rejects table with its reason.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from samclip.config import PipelineConfig
from samclip.model.images import decode_image
from samclip.tasks import storage
from samclip.tasks.curate import curate
from samclip.tasks.features import read_features
from samclip.tasks.precompute import precompute
from samclip.tasks.teachers import ensure_teachers

EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # EXIF orientation 6: the stored pixels must be turned 90 degrees clockwise


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _png_header_only(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header declares width x height pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CW
    return _encode(_noise(80, 40, seed=5), "JPEG", exif=exif.tobytes())


def _palette_with_transparency() -> bytes:
    image = _noise(40, 40, seed=6).convert("P")
    return _encode(image, "PNG", transparency=0)


def _bad_files() -> dict[str, bytes]:
    """One file per kind; the name says the kind."""
    truncated_png = _encode(_noise(64, 64, seed=7), "PNG")
    truncated_jpeg = _encode(_noise(64, 64, seed=8), "JPEG")
    return {
        # decodes fully: normalised to 8-bit RGB
        "rgb.png": _encode(_noise(48, 40, seed=1), "PNG"),
        "exif-rotated.jpg": _exif_rotated_jpeg(),
        "grey-l.png": _encode(_noise(40, 36, seed=2).convert("L"), "PNG"),
        "bilevel-1.png": _encode(_noise(40, 36, seed=3).convert("1"), "PNG"),
        "palette-transparent.png": _palette_with_transparency(),
        "rgba.png": _encode(_noise(40, 40, seed=4).convert("RGBA"), "PNG"),
        "cmyk-adobe.jpg": _encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"),
        "grey-16bit.png": _encode(
            Image.fromarray(np.linspace(0, 65535, 40 * 40).astype(np.uint16).reshape(40, 40)), "PNG"
        ),
        "animated.gif": _encode(
            _noise(40, 40, seed=9).convert("P"), "GIF", save_all=True,
            append_images=[_noise(40, 40, seed=10).convert("P")],
        ),
        # rejected with a reason
        "empty.png": b"",
        "text.jpg": b"just some text, saved with an image extension\n",
        "html.png": b"<!doctype html><html><body>404 not found</body></html>",
        "truncated.png": truncated_png[: len(truncated_png) // 2],
        "truncated.jpg": truncated_jpeg[: len(truncated_jpeg) // 2],
        "bomb-over-pil-limit.png": _png_header_only(20000, 20000),
        "bomb-over-max-pixels.png": _png_header_only(3000, 3000),
        "tiny.png": _encode(_noise(8, 8), "PNG"),
        "extreme-aspect.png": _encode(_noise(640, 20), "PNG"),  # 32:1
    }


ACCEPTED = {
    # name: (width, height) stored in the manifest, the size after EXIF orientation
    "rgb.png": (48, 40),
    "exif-rotated.jpg": (40, 80),
    "grey-l.png": (40, 36),
    "bilevel-1.png": (40, 36),
    "palette-transparent.png": (40, 40),
    "rgba.png": (40, 40),
    "cmyk-adobe.jpg": (40, 40),
    "grey-16bit.png": (40, 40),
    "animated.gif": (40, 40),
}
REJECTED = {
    "empty.png": ("empty",),
    "text.jpg": ("not_an_image",),
    "html.png": ("not_an_image",),
    "truncated.png": ("truncated", "corrupt"),
    "truncated.jpg": ("truncated", "corrupt"),
    "bomb-over-pil-limit.png": ("too_many_pixels",),
    "bomb-over-max-pixels.png": ("too_many_pixels",),
    "tiny.png": ("too_small",),
    "extreme-aspect.png": ("bad_aspect",),
}


@pytest.fixture(scope="module")
def curated(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    folder = root / "images"
    folder.mkdir()
    for name, data in _bad_files().items():
        (folder / name).write_bytes(data)
    config = PipelineConfig.model_validate(
        {
            "storage": {"root": str(root / "run")},
            "ray": {"num_cpus": 2},
            # 5M pixels: the 3000 x 3000 header trips this limit; 20000 x 20000 trips PIL's own
            "data": {"source": str(folder), "min_side": 16, "max_aspect": 8.0, "max_pixels": 5_000_000},
        }
    )
    result = curate(config)
    manifest = {row["uri"].rsplit("/", 1)[1]: row for row in pq.read_table(result.manifest_uri).to_pylist()}
    rejects = {row["uri"].rsplit("/", 1)[1]: row for row in pq.read_table(result.rejects_uri).to_pylist()}
    return result, folder, manifest, rejects


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_curate_normalises_kind(curated, name):
    _, folder, manifest, _ = curated
    assert name in manifest
    assert (manifest[name]["width"], manifest[name]["height"]) == ACCEPTED[name]
    # the stored size is the size that every later step decodes
    array = decode_image((folder / name).read_bytes())
    assert array.shape == (ACCEPTED[name][1], ACCEPTED[name][0], 3)
    assert array.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_curate_rejects_kind(curated, name):
    _, _, manifest, rejects = curated
    assert name not in manifest
    assert rejects[name]["reason"] in REJECTED[name]
    assert rejects[name]["detail"]


def test_curate_summary_counts_reasons(curated):
    result, _, _, rejects = curated
    summary = storage.read_json(result.summary_uri)
    assert summary["counts"]["accepted"] == len(ACCEPTED)
    assert summary["counts"]["rejected"] == len(REJECTED)
    assert sum(summary["rejected_by_reason"].values()) == len(rejects)
    assert summary["width"]["max"] == 48


def test_cmyk_and_16bit_pixels_through_curate(curated):
    _, folder, _, _ = curated
    red = decode_image((folder / "cmyk-adobe.jpg").read_bytes()).astype(int)
    assert np.all(np.abs(red - (255, 0, 0)) <= 8)
    grey = decode_image((folder / "grey-16bit.png").read_bytes())
    # scaled from the 0..65535 range to 0..255, not clipped at 255
    assert grey.min() == 0 and grey.max() == 255
    assert len(np.unique(grey)) > 200


def test_precompute_mixed_sizes_in_one_batch(ray_cluster, tmp_path):
    """Sizes from 1 x 300 to 300 x 1 in one batch: no resize reaches a side of 0 pixels."""
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(300, 1), (1, 300), (31, 17), (200, 120), (64, 64), (5, 2)]
    for index, (width, height) in enumerate(sizes):
        (folder / f"{index}.png").write_bytes(_encode(_noise(width, height, seed=index), "PNG"))
    config = PipelineConfig.model_validate(
        {
            "storage": {"root": str(tmp_path / "run")},
            "ray": {"num_cpus": 2},
            "data": {"source": str(folder), "min_side": 1, "max_aspect": 1000.0},
            "precompute": {"batch_size": len(sizes), "rows_per_shard": len(sizes)},
        }
    )
    result = curate(config)
    manifest = pq.read_table(result.manifest_uri).to_pylist()
    assert sorted((row["width"], row["height"]) for row in manifest) == sorted(sizes)

    features = precompute(config, result.manifest_uri, ensure_teachers(config))
    assert features.computed == {"clip": len(sizes), "sam": len(sizes)}
    for kind in ("clip", "sam"):
        stored = read_features(features.features[kind])
        assert len(stored) == len(sizes)
        assert all(np.isfinite(array.astype(np.float32)).all() for array in stored.values())


def test_curate_rejects_unreadable_file(ray_cluster, tmp_path, monkeypatch):
    """A listed file that is gone (or not permitted) when a worker reads it: reject ``unreadable``."""
    import samclip.tasks.curate as curate_module

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "kept.png").write_bytes(_encode(_noise(48, 40, seed=1), "PNG"))
    (folder / "deleted.png").write_bytes(_encode(_noise(48, 40, seed=2), "PNG"))
    expected = {"deleted.png": "FileNotFoundError"}
    if os.geteuid() != 0:  # root can read a file whatever its permission bits are
        (folder / "no-permission.png").write_bytes(_encode(_noise(48, 40, seed=3), "PNG"))
        (folder / "no-permission.png").chmod(0)
        expected["no-permission.png"] = "PermissionError"

    listed_by_curate = []

    def list_then_delete(source, layout="auto"):
        listing = original_list_source(source, layout)
        listed_by_curate.extend(listing[1])
        (folder / "deleted.png").unlink()  # gone between listing and reading
        return listing

    original_list_source = curate_module.list_source
    monkeypatch.setattr(curate_module, "list_source", list_then_delete)
    config = PipelineConfig.model_validate(
        {"storage": {"root": str(tmp_path / "run")}, "ray": {"num_cpus": 2}, "data": {"source": str(folder)}}
    )
    result = curate(config)

    assert str(folder / "deleted.png") in listed_by_curate
    manifest = [row["uri"].rsplit("/", 1)[1] for row in pq.read_table(result.manifest_uri).to_pylist()]
    assert manifest == ["kept.png"]
    rejects = {row["uri"].rsplit("/", 1)[1]: row for row in pq.read_table(result.rejects_uri).to_pylist()}
    assert sorted(rejects) == sorted(expected)
    for name, error in expected.items():
        assert rejects[name]["reason"] == "unreadable"
        assert rejects[name]["detail"].startswith(f"{error}: ")
        assert name in rejects[name]["detail"]
    assert result.counts["listed"] == 1 + len(expected)
    assert result.counts["rejected/unreadable"] == len(expected)
