"""Built-in photographs: copies, crops and labels."""

from __future__ import annotations

import csv
import os

from samclip.model.images import decode_image
from samclip.tasks import sources


def test_every_builtin_photo_is_installed():
    found = sources.available_photos()
    assert len(found) == len(sources.BUILTIN_PHOTOS)
    for photo, path in found:
        assert os.path.isfile(path), photo.file
        assert photo.label
        assert photo.licence


def test_materialise_copies_and_crops(tmp_path):
    target = str(tmp_path / "photos")
    photos = sources.materialise_builtin_photos(target, augment_crops=2, seed=0)

    count = len(sources.BUILTIN_PHOTOS)
    assert len(photos) == count * 3
    assert all(label for _, label in photos)

    originals = {photo.file: path for photo, path in sources.available_photos()}
    for name, path in originals.items():
        with open(path, "rb") as handle:
            expected = handle.read()
        assert (tmp_path / "photos" / "originals" / name).read_bytes() == expected, name

    crop_uri, crop_label = photos[1]
    assert crop_uri.endswith("crops/astronaut-crop0.png")
    assert crop_label == "astronaut"
    crop = decode_image((tmp_path / "photos" / "crops" / "astronaut-crop0.png").read_bytes())
    assert crop.shape[0] < 512
    assert crop.shape[1] < 512


def test_labels_csv_lists_every_file(tmp_path):
    target = tmp_path / "photos"
    photos = sources.materialise_builtin_photos(str(target), augment_crops=1, seed=0)
    with open(target / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["file"] for row in rows] == [os.path.relpath(uri, target) for uri, _ in photos]
    assert [row["label"] for row in rows] == [label for _, label in photos]
    assert all(row["licence"] for row in rows)


def test_crops_deterministic_by_seed(tmp_path):
    first = tmp_path / "a"
    second = tmp_path / "b"
    third = tmp_path / "c"
    sources.materialise_builtin_photos(str(first), augment_crops=1, seed=3)
    sources.materialise_builtin_photos(str(second), augment_crops=1, seed=3)
    sources.materialise_builtin_photos(str(third), augment_crops=1, seed=4)
    name = "crops/chelsea-crop0.png"
    assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / name).read_bytes() != (third / name).read_bytes()
