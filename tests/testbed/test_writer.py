"""Testbed writer: same seed, same bytes; files that agree with each other and the readers."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samclip.model.images import decode_image
from samclip.model.rle import decode_mask, mask_bbox
from samclip.testbed.scenes import CLASS_NAMES, generate_scene
from samclip.testbed.writer import main, voc_palette, write_testbed

COUNT = 24
SEED = 5
SIZE = 64


def _tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file()}  # fmt: skip


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("testbed") / "shapes"
    write_testbed(root, COUNT, SEED, size=SIZE, val_fraction=0.3)
    return root


def test_testbed_same_seed_same_bytes(testbed, tmp_path):
    again = tmp_path / "again"
    write_testbed(again, COUNT, SEED, size=SIZE, val_fraction=0.3)
    first, second = _tree(testbed), _tree(again)
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], f"{name} differs between two runs with one seed"


def test_testbed_other_seed_other_bytes(testbed, tmp_path):
    other = tmp_path / "other"
    write_testbed(other, COUNT, SEED + 1, size=SIZE, val_fraction=0.3)
    first, second = _tree(testbed), _tree(other)
    assert sorted(first) == sorted(second)  # same layout
    for index in range(COUNT):
        name = f"images/scene_{index:06d}.png"
        assert first[name] != second[name], f"{name} is the same for seeds {SEED} and {SEED + 1}"


def test_testbed_layout(testbed):
    images = sorted(path.name for path in (testbed / "images").glob("*.png"))
    assert images == [f"scene_{index:06d}.png" for index in range(COUNT)]
    assert len(list((testbed / "images").glob("*.json"))) == COUNT
    assert len(list((testbed / "voc" / "SegmentationClass").glob("*.png"))) == COUNT
    assert len(list((testbed / "voc" / "SegmentationObject").glob("*.png"))) == COUNT
    classes = (testbed / "voc" / "classes.txt").read_text().splitlines()
    assert classes == list(CLASS_NAMES)
    summary = json.loads((testbed / "testbed.json").read_text())
    assert summary["settings"]["count"] == COUNT
    assert summary["counts"]["scenes"] == COUNT


@pytest.mark.parametrize("index", range(COUNT))
def test_files_match_scene(testbed, index):
    scene = generate_scene(SEED, index, SIZE)
    stem = f"scene_{index:06d}"
    png = (testbed / "images" / f"{stem}.png").read_bytes()
    assert np.array_equal(decode_image(png), scene.image)  # PNG is lossless

    document = json.loads((testbed / "images" / f"{stem}.json").read_text())
    assert document["image"] == {
        "image_id": index, "width": SIZE, "height": SIZE, "file_name": f"{stem}.png",
    }  # fmt: skip
    annotations = document["annotations"]
    assert len(annotations) == len(scene.instances)
    for annotation, instance in zip(annotations, scene.instances):
        mask = decode_mask(annotation["segmentation"])
        assert np.array_equal(mask, instance.mask)
        assert annotation["bbox"] == list(mask_bbox(mask))  # XYWH
        assert annotation["area"] == int(mask.sum())
        x, y = annotation["point_coords"][0]
        assert mask[int(y), int(x)]
        assert annotation["crop_box"] == [0.0, 0.0, float(SIZE), float(SIZE)]


@pytest.mark.parametrize("index", range(COUNT))
def test_semantic_png_is_union_of_json_masks(testbed, index):
    stem = f"scene_{index:06d}"
    record = json.loads((testbed / "ground_truth.jsonl").read_text().splitlines()[index])
    document = json.loads((testbed / "images" / f"{stem}.json").read_text())
    semantic = Image.open(testbed / "voc" / "SegmentationClass" / f"{stem}.png")
    instances = Image.open(testbed / "voc" / "SegmentationObject" / f"{stem}.png")
    assert semantic.mode == "P"
    assert semantic.getpalette()[:24] == voc_palette()[:24]

    expected_semantic = np.zeros((SIZE, SIZE), dtype=np.uint8)
    expected_instances = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for number, (annotation, item) in enumerate(
        zip(document["annotations"], record["objects"]), start=1
    ):
        mask = decode_mask(annotation["segmentation"])
        expected_semantic[mask] = CLASS_NAMES.index(item["class_name"])
        expected_instances[mask] = number
        assert item["bbox"] == [int(value) for value in annotation["bbox"]]
    assert np.array_equal(np.array(semantic), expected_semantic)
    assert np.array_equal(np.array(instances), expected_instances)


def test_tables_agree_with_ground_truth(testbed):
    lines = (testbed / "ground_truth.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    captions = _rows(testbed / "captions.csv")
    labels = _rows(testbed / "labels.csv")
    colours = _rows(testbed / "colour_labels.csv")
    assert [row["file"] for row in captions] == [record["file"] for record in records]
    for record, caption, label, colour in zip(records, captions, labels, colours):
        for item in record["objects"]:
            assert f"{item['colour']} {item['class_name']}" in caption["caption"]
        largest = max(record["objects"], key=lambda item: item["area"])
        assert label["label"] == largest["class_name"] == record["label"]
        assert label["colour"] == colour["label"] == largest["colour"]


def test_image_sets_follow_curation_split(testbed):
    from samclip.tasks.curate import _fraction

    folder = testbed / "voc" / "ImageSets" / "Segmentation"
    train = set(folder.joinpath("train.txt").read_text().split())
    val = set(folder.joinpath("val.txt").read_text().split())
    assert not train & val
    assert train | val == set(folder.joinpath("trainval.txt").read_text().split())
    assert len(train | val) == COUNT
    for path in (testbed / "images").glob("*.png"):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        expected = "val" if _fraction(digest, 8, 16) < 0.3 else "train"
        assert (path.stem in val) == (expected == "val"), path.name


def test_pipeline_readers_accept_testbed(testbed):
    from samclip.tasks.curate import read_labels
    from samclip.tasks.sources_sa1b import parse_annotations

    for path in sorted((testbed / "images").glob("*.png")):
        document = json.loads(path.with_suffix(".json").read_text())
        rows = parse_annotations(document, "hash", SIZE, SIZE)
        assert len(rows) == len(document["annotations"])
        assert all(row["point"] is not None for row in rows)
    labels = read_labels(str(testbed / "labels.csv"))
    assert len(labels) == COUNT
    assert set(labels.values()) <= set(CLASS_NAMES[1:])


def test_testbed_reused_when_settings_match(testbed):
    settings = testbed / "testbed.json"
    before = settings.stat().st_mtime_ns
    summary = write_testbed(testbed, COUNT, SEED, size=SIZE, val_fraction=0.3)
    assert summary["settings"]["seed"] == SEED
    assert settings.stat().st_mtime_ns == before


def test_testbed_rejects_other_settings(testbed):
    with pytest.raises(ValueError, match="not empty"):
        write_testbed(testbed, COUNT + 1, SEED, size=SIZE, val_fraction=0.3)


def test_testbed_overwrite_replaces(tmp_path):
    root = tmp_path / "set"
    write_testbed(root, 6, 0, size=32)
    (root / "notes.txt").write_text("kept")
    write_testbed(root, 3, 1, size=32, overwrite=True)
    assert len(list((root / "images").glob("*.png"))) == 3
    assert json.loads((root / "testbed.json").read_text())["settings"]["seed"] == 1
    assert (root / "notes.txt").read_text() == "kept"  # only the testbed's own files go


@pytest.mark.parametrize(("count", "fraction"), [(0, 0.2), (3, 1.0), (3, -0.1)])
def test_testbed_invalid_settings(tmp_path, count, fraction):
    with pytest.raises(ValueError):
        write_testbed(tmp_path / "x", count, 0, size=32, val_fraction=fraction)


def test_cli_writes_testbed(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--count", "4", "--seed", "2", "--size", "48"]) == 0
    assert json.loads(capsys.readouterr().out)["scenes"] == 4
    assert len(list((out / "images").glob("*.png"))) == 4
