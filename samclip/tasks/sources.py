"""Built-in real photographs: sample images that installed packages ship, with labels.

The smoke profile curates these instead of downloading a dataset. Each entry records the file,
the package that ships it, a class label for zero-shot evaluation, and the licence as the
package states it (scikit-image's ``skimage/data/_fetchers.py`` docstrings, scikit-learn's
``sklearn/datasets/images/README.txt``). matplotlib's ``sample_data/README.txt`` states no
licence for its photograph, and the entry records that.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from dataclasses import dataclass
from importlib.util import find_spec

import numpy as np
from PIL import Image

from samclip.model.images import decode_image
from samclip.tasks import storage

logger = logging.getLogger(__name__)

BUILTIN_SOURCE = "builtin:photos"
LABELS_FILE = "labels.csv"

# Crops keep this share of each side, drawn uniformly per crop.
CROP_SIDE_RANGE = (0.5, 0.85)


@dataclass(frozen=True)
class BuiltinPhoto:
    """One photograph shipped inside an installed package."""

    package: str  # importable package that ships the file
    folder: str  # folder inside that package
    file: str
    label: str  # class name used for zero-shot evaluation
    licence: str  # as the package's own documentation states it

    def path(self) -> str | None:
        """Return the file's local path, or None when the package is not installed."""
        spec = find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        root = list(spec.submodule_search_locations)[0]
        path = os.path.join(root, self.folder, self.file)
        return path if os.path.isfile(path) else None


_SKIMAGE = "skimage"
_SKIMAGE_DATA = "data"

BUILTIN_PHOTOS: tuple[BuiltinPhoto, ...] = (
    BuiltinPhoto(_SKIMAGE, _SKIMAGE_DATA, "astronaut.png", "astronaut",
                 "public domain (NASA; no known copyright restrictions)"),
    BuiltinPhoto(_SKIMAGE, _SKIMAGE_DATA, "chelsea.png", "cat",
                 "CC0 (photographer Stefan van der Walt)"),
    BuiltinPhoto(_SKIMAGE, _SKIMAGE_DATA, "coffee.png", "coffee cup",
                 "CC0 (photographer Rachel Michetti)"),
    BuiltinPhoto(_SKIMAGE, _SKIMAGE_DATA, "rocket.jpg", "rocket",
                 "public domain (released by SpaceX)"),
    BuiltinPhoto(_SKIMAGE, _SKIMAGE_DATA, "camera.png", "cameraman",
                 "CC0 (photographer Lav Varshney)"),
    BuiltinPhoto(_SKIMAGE, _SKIMAGE_DATA, "coins.png", "coins",
                 "no known copyright restrictions (Brooklyn Museum collection)"),
    BuiltinPhoto(_SKIMAGE, _SKIMAGE_DATA, "clock_motion.png", "clock",
                 "public domain (photographer Stefan van der Walt)"),
    BuiltinPhoto(_SKIMAGE, _SKIMAGE_DATA, "hubble_deep_field.jpg", "galaxy",
                 "public domain (NASA)"),
    BuiltinPhoto(_SKIMAGE, _SKIMAGE_DATA, "motorcycle_left.png", "motorcycle",
                 "not stated by scikit-image (Middlebury 2014 stereo benchmark)"),
    BuiltinPhoto(_SKIMAGE, _SKIMAGE_DATA, "motorcycle_right.png", "motorcycle",
                 "not stated by scikit-image (Middlebury 2014 stereo benchmark)"),
    BuiltinPhoto("matplotlib", "mpl-data/sample_data", "grace_hopper.jpg", "person",
                 "not stated by matplotlib (sample_data/README.txt names no licence)"),
    BuiltinPhoto("sklearn", "datasets/images", "china.jpg", "temple",
                 "CC BY 2.0 (danielbuechele on Flickr)"),
    BuiltinPhoto("sklearn", "datasets/images", "flower.jpg", "flower",
                 "CC BY 2.0 (vultilion on Flickr)"),
)


def available_photos() -> list[tuple[BuiltinPhoto, str]]:
    """Return the built-in photos whose package is installed, with their local paths."""
    found = []
    for photo in BUILTIN_PHOTOS:
        path = photo.path()
        if path is None:
            logger.warning(
                "built-in photo %s/%s/%s not found: is %s installed? skipping it",
                photo.package, photo.folder, photo.file, photo.package,
            )
            continue
        found.append((photo, path))
    return found


def materialise_builtin_photos(
    target_uri: str, augment_crops: int = 0, seed: int = 0
) -> list[tuple[str, str]]:
    """Copy the built-in photos under ``target_uri`` and add deterministic crops of each.

    Originals are copied byte for byte to ``originals/``. Each original also gets
    ``augment_crops`` crops in ``crops/``, re-encoded as PNG and labelled as the original. A crop
    depends only on the seed, the file name and its index, so reruns write identical files.
    Files that already exist are kept. ``labels.csv`` (columns ``file``, ``label``, ``package``,
    ``licence``; ``file`` relative to ``target_uri``) is written beside them.

    Returns (uri, label) for every original and crop.
    """
    if augment_crops < 0:
        raise ValueError(f"augment_crops must be >= 0, got {augment_crops}")
    photos = available_photos()
    if not photos:
        raise RuntimeError(
            "no built-in photos found: install scikit-image (and matplotlib or scikit-learn)"
        )

    entries: list[tuple[str, str, BuiltinPhoto]] = []  # (relative file, label, photo)
    for photo, path in photos:
        with open(path, "rb") as handle:
            original = handle.read()
        relative = f"originals/{photo.file}"
        _write_once(storage.join(target_uri, relative), original)
        entries.append((relative, photo.label, photo))

        if augment_crops:
            image = decode_image(original, max_pixels=50_000_000, min_side=1, max_aspect=1000.0)
            stem = os.path.splitext(photo.file)[0]
            for index in range(augment_crops):
                relative = f"crops/{stem}-crop{index}.png"
                uri = storage.join(target_uri, relative)
                if not storage.exists(uri):
                    storage.write_bytes(uri, _encode_png(_crop(image, seed, photo.file, index)))
                entries.append((relative, photo.label, photo))

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "label", "package", "licence"])
    for relative, label, photo in entries:
        writer.writerow([relative, label, photo.package, photo.licence])
    storage.write_text(storage.join(target_uri, LABELS_FILE), buffer.getvalue())

    logger.info(
        "built-in photos: %d originals and %d crops under %s",
        len(photos), len(photos) * augment_crops, target_uri,
    )
    return [(storage.join(target_uri, relative), label) for relative, label, _ in entries]


def _write_once(uri: str, data: bytes) -> None:
    if not storage.exists(uri):
        storage.write_bytes(uri, data)


def _crop(image: np.ndarray, seed: int, file: str, index: int) -> np.ndarray:
    """Cut one crop; the random draw depends only on (seed, file name, index)."""
    name_key = int.from_bytes(hashlib.sha256(file.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, name_key, index])
    height, width = image.shape[:2]
    crop_height = max(1, int(round(height * rng.uniform(*CROP_SIDE_RANGE))))
    crop_width = max(1, int(round(width * rng.uniform(*CROP_SIDE_RANGE))))
    top = int(rng.integers(0, height - crop_height + 1))
    left = int(rng.integers(0, width - crop_width + 1))
    return image[top : top + crop_height, left : left + crop_width]


def _encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
