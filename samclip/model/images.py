"""Image decoding and the input transforms of the SAM and CLIP branches.

`decode_image` is the one decoder every pipeline step uses, so curation rejects exactly the files
that training would fail on. Images are (H, W, 3) uint8 RGB arrays; model inputs are float
tensors of shape (3, S, S) normalised with SAM's pixel statistics.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.transforms.functional import resize, to_pil_image

logger = logging.getLogger(__name__)

# SAM's pixel statistics on the 0-255 scale (segment_anything 1.0, build_sam.py).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

# Transparent pixels are composited on this fixed background, so every step decodes them alike.
TRANSPARENCY_BACKGROUND = (255, 255, 255)


class ImageRejected(ValueError):
    """An input that cannot become an RGB image; `reason` is a short code for rejects tables."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_image(
    data: bytes,
    max_pixels: int = 50_000_000,
    min_side: int = 1,
    max_aspect: float | None = None,
) -> np.ndarray:
    """Decode encoded image bytes into an (H, W, 3) uint8 RGB array.

    The pixel count in the header is checked against `max_pixels` before any pixel is decoded.
    The whole file is decoded, so truncated files fail here and not later in training. EXIF
    orientation is applied once. Only the first frame of animated formats is used.
    Transparent pixels are composited on white.

    NOTE: PIL's Image.MAX_IMAGE_PIXELS (89,478,485 in Pillow 13) also applies, so a max_pixels
    above it has no effect.

    Raises:
        ImageRejected: with reason "empty", "not_an_image", "too_many_pixels", "truncated",
            "corrupt", "unsupported_mode", "too_small" or "bad_aspect".
    """
    if not data:
        raise ImageRejected("empty", "the file has 0 bytes")

    # header: Image.open reads only the size and mode
    # PIL's own limit (Image.MAX_IMAGE_PIXELS) applies too. It is not lifted, because that would
    # lift it for every caller in the process.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRejected("too_many_pixels", str(e)) from e
        except UnidentifiedImageError as e:
            raise ImageRejected(
                "not_an_image", f"PIL cannot identify an image format in {len(data)} bytes"
            ) from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageRejected("corrupt", f"the image header is invalid: {e}") from e

    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(
            "too_many_pixels",
            f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}",
        )

    # pixels
    try:
        image.load()
    except OSError as e:
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise ImageRejected(reason, f"decoding {image.format} failed: {e}") from e
    except (SyntaxError, ValueError, EOFError) as e:
        raise ImageRejected("corrupt", f"decoding {image.format} failed: {e}") from e

    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError) as e:
        # A malformed EXIF block does not make the pixels unusable.
        logger.warning("EXIF orientation ignored because the EXIF data is invalid: %s", e)

    array = _to_rgb_array(image)

    height, width = array.shape[:2]
    if min(height, width) < min_side:
        raise ImageRejected(
            "too_small", f"{width}x{height} has a side shorter than min_side={min_side}"
        )
    aspect = max(height, width) / min(height, width)
    if max_aspect is not None and aspect > max_aspect:
        raise ImageRejected(
            "bad_aspect",
            f"{width}x{height} has aspect ratio {aspect:.1f} > max_aspect={max_aspect}",
        )
    return array


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image of any supported mode into (H, W, 3) uint8 RGB."""
    mode = image.mode
    if mode == "RGB":
        return np.array(image, dtype=np.uint8)

    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, TRANSPARENCY_BACKGROUND + (255,))
        return np.array(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)

    if mode.startswith("I;16") or mode == "I" or mode == "F":
        grey = _high_depth_to_uint8(np.asarray(image))
        return np.repeat(grey[:, :, None], 3, axis=2)

    try:
        # L, 1, P, YCbCr and CMYK. Pillow 13 reads every CMYK JPEG with Adobe's inverted
        # convention, which its own JPEG encoder also writes.
        return np.array(image.convert("RGB"), dtype=np.uint8)
    except ValueError as e:
        raise ImageRejected(
            "unsupported_mode", f"PIL cannot convert mode {mode} to RGB: {e}"
        ) from e


def _high_depth_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float greyscale image (H, W) to uint8 (H, W).

    Integers within 0..65535 are 16-bit samples and keep their top 8 bits. Floats within 0..1
    are multiplied by 255. Anything else is stretched linearly from its own min..max.
    """
    if np.issubdtype(values.dtype, np.integer):
        wide = values.astype(np.int64)
        if wide.min() >= 0 and wide.max() <= 65535:
            return (wide >> 8).astype(np.uint8)
    else:
        wide = np.nan_to_num(values.astype(np.float64))
        if wide.min() >= 0.0 and wide.max() <= 1.0:
            return np.round(wide * 255.0).astype(np.uint8)

    low, high = float(wide.min()), float(wide.max())
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((wide - low) * (255.0 / (high - low))).astype(np.uint8)


def _check_rgb_array(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"expected an (H, W, 3) RGB array, got {shape}; decode with decode_image")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """Normalise (3, H, W) float pixels on the 0-255 scale with SAM's mean and std."""
    mean = torch.tensor(SAM_PIXEL_MEAN, dtype=pixels.dtype).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, dtype=pixels.dtype).view(3, 1, 1)
    return (pixels - mean) / std


def sam_resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Return (h, w) after resizing the longest side to `size`, as SAM's ResizeLongestSide does.

    The short side is kept at 1 pixel at least, where ResizeLongestSide would round it to 0.
    """
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(height, width, size)
    return max(new_h, 1), max(new_w, 1)


def sam_input(image: np.ndarray, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Build SAM's input from an (H, W, 3) uint8 image.

    The longest side is resized to `size` as SamPredictor.set_image does, the pixels are
    normalised with SAM's statistics, and the bottom and right are zero-padded.

    Returns:
        The (3, size, size) float tensor and the (h, w) of the resized image inside it.
    """
    _check_rgb_array(image)
    resized_hw = sam_resized_shape(image.shape[0], image.shape[1], size)
    resized = np.asarray(resize(to_pil_image(image), list(resized_hw)))  # (h, w, 3) uint8

    pixels = torch.from_numpy(resized.copy()).permute(2, 0, 1).float()  # (3, h, w)
    pixels = _normalise(pixels)
    padded = F.pad(pixels, (0, size - resized_hw[1], 0, size - resized_hw[0]))  # (3, size, size)
    return padded, resized_hw


def student_clip_input(image: np.ndarray, size: int) -> torch.Tensor:
    """Build the student's CLIP-branch input (3, size, size) from an (H, W, 3) uint8 image.

    The crop is the centred square of side min(H, W), which is the region a CLIP
    resize-shortest-then-centre-crop transform keeps. It is resized with antialiased bicubic
    interpolation and normalised with SAM's statistics, because the student is a SAM backbone.
    """
    _check_rgb_array(image)
    height, width = image.shape[:2]
    side = min(height, width)
    # same rounding as torchvision's CenterCrop
    top = int(round((height - side) / 2.0))
    left = int(round((width - side) / 2.0))
    crop = image[top : top + side, left : left + side]

    pixels = torch.from_numpy(crop.copy()).permute(2, 0, 1).float()  # (3, s, s)
    pixels = F.interpolate(
        pixels[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True
    )[0]
    # bicubic overshoots; clamp back to the range a uint8 image can have
    return _normalise(pixels.clamp(0.0, 255.0))


def batch_sam_inputs(
    images: list[np.ndarray], size: int
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Stack `sam_input` of each image into (B, 3, size, size), with each image's resized (h, w)."""
    inputs = [sam_input(image, size) for image in images]
    return torch.stack([tensor for tensor, _ in inputs]), [hw for _, hw in inputs]


def batch_student_clip_inputs(images: list[np.ndarray], size: int) -> torch.Tensor:
    """Stack `student_clip_input` of each image into (B, 3, size, size)."""
    return torch.stack([student_clip_input(image, size) for image in images])
