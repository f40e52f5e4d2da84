from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from samclip.model.images import (
    ImageRejected,
    batch_sam_inputs,
    batch_student_clip_inputs,
    decode_image,
    sam_input,
    student_clip_input,
)
from samclip.model.sam_teacher import build_sam


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but which holds almost no pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def rejection_reason(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, **kwargs)
    return info.value.reason


def test_decode_rgb_png_exact():
    image = noise_image(20, 10)
    array = decode_image(encode(image, "PNG"))
    assert array.dtype == np.uint8
    assert array.shape == (10, 20, 3)
    assert np.array_equal(array, np.asarray(image))


def test_decode_empty_bytes():
    assert rejection_reason(b"") == "empty"


def test_decode_text_bytes():
    assert rejection_reason(b"this is a text file saved as photo.jpg\n" * 10) == "not_an_image"


def test_decode_truncated_jpeg():
    data = encode(noise_image(128, 128), "JPEG", quality=90)
    assert rejection_reason(data[: len(data) // 2]) == "truncated"


def test_rejection_carries_detail():
    with pytest.raises(ImageRejected) as info:
        decode_image(b"")
    assert isinstance(info.value, ValueError)
    assert info.value.detail
    assert "empty" in str(info.value)


def test_decode_exif_orientation_rotates():
    # 40 wide, 20 high, left half red; orientation 6 means "rotate 90 degrees clockwise to view"
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    array = decode_image(encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif))
    assert array.shape == (40, 20, 3)
    # after a clockwise turn the left half becomes the top half
    assert array[:18, :, 0].mean() > 200
    assert array[22:, :, 0].mean() < 50


def test_decode_exif_applied_once():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(noise_image(40, 20), "PNG", exif=exif)
    assert decode_image(data).shape == (40, 20, 3)


def test_decode_greyscale_l():
    array = decode_image(encode(Image.new("L", (5, 4), 77), "PNG"))
    assert array.shape == (4, 5, 3)
    assert np.all(array == 77)


def test_decode_bilevel_1():
    image = Image.new("1", (8, 2), 0)
    image.paste(1, (0, 0, 4, 2))
    array = decode_image(encode(image, "PNG"))
    assert array.shape == (2, 8, 3)
    assert np.all(array[:, :4] == 255)
    assert np.all(array[:, 4:] == 0)


def test_decode_palette_with_transparency_on_white():
    image = Image.new("P", (4, 2), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    image.paste(1, (2, 0, 4, 2))
    array = decode_image(encode(image, "PNG", transparency=0))
    assert np.all(array[:, :2] == 255)  # transparent index 0 becomes white
    assert np.all(array[:, 2:] == (0, 0, 255))


def test_decode_palette_without_transparency():
    image = Image.new("P", (2, 2), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    assert np.all(decode_image(encode(image, "PNG")) == (10, 200, 30))


def test_decode_rgba_composites_on_white():
    pixels = np.array(
        [[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8
    )  # transparent red, opaque blue, half-transparent black
    array = decode_image(encode(Image.fromarray(pixels, "RGBA"), "PNG"))
    assert array.shape == (1, 3, 3)
    assert tuple(array[0, 0]) == (255, 255, 255)
    assert tuple(array[0, 1]) == (0, 0, 255)
    assert np.all(np.abs(array[0, 2].astype(int) - 127) <= 1)


def test_decode_la_composites():
    image = Image.new("LA", (2, 2), (0, 0))
    assert np.all(decode_image(encode(image, "PNG")) == 255)


def test_decode_cmyk_jpeg():
    image = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = encode(image, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    array = decode_image(data).astype(int)
    assert array.shape == (16, 16, 3)
    assert np.all(np.abs(array - (255, 0, 0)) <= 8)


def test_decode_16bit_png_scaled_not_clipped():
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    array = decode_image(data)
    assert array.shape == (1, 4, 3)
    assert array[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.all(array[..., 0] == array[..., 2])


def test_decode_float_tiff():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    array = decode_image(encode(Image.fromarray(values, "F"), "TIFF"))
    assert array[0, :, 0].tolist() == [0, 128, 255]


def test_decode_over_max_pixels_before_decoding():
    # 8000 x 8000 = 64M pixels, under PIL's own limit but over max_pixels; the data is 100 bytes
    data = png_header_only(8000, 8000)
    assert rejection_reason(data, max_pixels=50_000_000) == "too_many_pixels"


def test_decode_pil_bomb_limit_is_a_rejection():
    # 10000 x 10000 = 100M pixels trips PIL's DecompressionBombWarning, even with a high max_pixels
    data = png_header_only(10000, 10000)
    assert rejection_reason(data, max_pixels=10**12) == "too_many_pixels"
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # never lifted globally


def test_decode_small_max_pixels():
    data = encode(noise_image(100, 100), "PNG")
    assert rejection_reason(data, max_pixels=5000) == "too_many_pixels"
    assert decode_image(data, max_pixels=10_000).shape == (100, 100, 3)


def test_decode_too_small():
    data = encode(noise_image(10, 40), "PNG")
    assert rejection_reason(data, min_side=32) == "too_small"


def test_decode_bad_aspect():
    data = encode(noise_image(2000, 1), "PNG")
    assert rejection_reason(data, max_aspect=8.0) == "bad_aspect"
    assert decode_image(data).shape == (1, 2000, 3)


def test_sam_input_matches_segment_anything():
    image = np.asarray(noise_image(300, 180))
    tensor, resized_hw = sam_input(image, 256)
    assert tensor.shape == (3, 256, 256)
    assert resized_hw == (154, 256)

    resized = ResizeLongestSide(256).apply_image(image)
    reference = build_sam("tiny").preprocess(torch.as_tensor(resized).permute(2, 0, 1).float())
    assert torch.allclose(tensor, reference, atol=1e-6)
    assert torch.all(tensor[:, 154:] == 0)


def test_sam_input_extreme_aspect():
    tensor, resized_hw = sam_input(np.zeros((1, 2000, 3), dtype=np.uint8), 256)
    assert tensor.shape == (3, 256, 256)
    assert resized_hw == (1, 256)
    assert torch.isfinite(tensor).all()


def test_sam_input_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        sam_input(np.zeros((10, 10), dtype=np.uint8), 256)
    with pytest.raises(ValueError, match="uint8"):
        sam_input(np.zeros((10, 10, 3), dtype=np.float32), 256)


def test_student_clip_input_centre_crop():
    # a wide image whose centre square is white and whose sides are black
    image = np.zeros((50, 150, 3), dtype=np.uint8)
    image[:, 50:100] = 255
    tensor = student_clip_input(image, 32)
    assert tensor.shape == (3, 32, 32)
    white = (255.0 - 123.675) / 58.395
    assert torch.allclose(tensor[0], torch.full((32, 32), white), atol=1e-4)


def test_student_clip_input_same_size_is_normalisation():
    image = np.asarray(noise_image(32, 32))
    tensor = student_clip_input(image, 32)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    expected = (torch.from_numpy(image.copy()).permute(2, 0, 1).float() - mean) / std
    assert torch.allclose(tensor, expected, atol=1e-4)


def test_student_clip_input_extreme_aspect():
    tensor = student_clip_input(np.zeros((1, 2000, 3), dtype=np.uint8), 64)
    assert tensor.shape == (3, 64, 64)
    assert torch.isfinite(tensor).all()


def test_batch_inputs():
    images = [np.asarray(noise_image(64, 32)), np.asarray(noise_image(20, 80))]
    tensors, sizes = batch_sam_inputs(images, 256)
    assert tensors.shape == (2, 3, 256, 256)
    assert sizes == [(128, 256), (256, 64)]
    assert batch_student_clip_inputs(images, 128).shape == (2, 3, 128, 128)
