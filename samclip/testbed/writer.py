"""Write a testbed dataset: scenes as files in the layouts the pipeline reads.

Layout under the output folder (``{stem}`` is ``scene_{index:06d}``)::

    images/{stem}.png            the scene, RGB PNG
    images/{stem}.json           SA-1B-style masks of the visible objects (COCO compressed RLE)
    captions.csv                 file, caption
    labels.csv                   file, label (shape class of the largest object), colour
    labels_val.csv               the val split's rows, files named images/{stem}.png
    colour_labels.csv            file, label (colour of the largest object)
    ground_truth.jsonl           one JSON object per scene: split, caption, every object's class,
                                 colour, box, areas and point
    voc/SegmentationClass/{stem}.png   semantic mask, palette PNG, value = index in classes.txt
    voc/SegmentationObject/{stem}.png  instance mask, palette PNG, value = instance number
    voc/ImageSets/Segmentation/{train,val,trainval}.txt
    voc/classes.txt              class names, background first
    coco/instances_val.json      COCO instances of the val split (RLE masks, XYWH boxes),
                                 category ids 1.. in the order of classes.txt
    testbed.json                 the settings and counts; written last, it marks a finished set

The ``file`` column of the CSVs holds the PNG's file name, which ``read_labels`` in
``samclip.tasks.curate`` matches against any source folder that contains ``images/``. The split
follows curation's own rule on the PNG's SHA-256 (``val`` when ``int(sha[8:16], 16) / 16**8 <
val_fraction``), so ``ImageSets`` agrees with the manifest that curation writes with the same
``data.val_fraction``.

Every file is a function of (seed, count, size, spec): PNGs are written with fixed zlib settings
and no metadata, JSON with fixed separators and CSVs with ``\\n`` line ends, so the same settings
give the same bytes on one installation (zlib and numpy versions are part of that).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from samclip.model.rle import encode_mask
from samclip.testbed.scenes import CLASS_NAMES, DEFAULT_SIZE, Scene, SceneSpec, generate_scene

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump when the layout or the generator changes what a seed produces
PNG_COMPRESS_LEVEL = 6  # fixed, so the bytes do not depend on Pillow's default
PROGRESS_EVERY_S = 10.0
SETTINGS_FILE = "testbed.json"
# Everything write_testbed creates; overwrite removes exactly these.
OUTPUTS = ("images", "voc", "coco", "captions.csv", "labels.csv", "labels_val.csv",
           "colour_labels.csv", "ground_truth.jsonl", SETTINGS_FILE)  # fmt: skip


def voc_palette() -> list[int]:
    """Return PASCAL VOC's 256-colour palette as a flat [r, g, b, ...] list (VOCdevkit's bitget)."""
    palette = []
    for value in range(256):
        red = green = blue = 0
        code = value
        for bit in range(8):
            red |= ((code >> 0) & 1) << (7 - bit)
            green |= ((code >> 1) & 1) << (7 - bit)
            blue |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette.extend((red, green, blue))
    return palette


def encode_png(array: np.ndarray, palette: list[int] | None = None) -> bytes:
    """Encode an (H, W, 3) RGB or, with a palette, an (H, W) indexed uint8 array as PNG bytes."""
    if palette is None:
        image = Image.fromarray(array)
    else:
        # frombytes keeps the values as indices; converting an "L" image to "P" would remap them
        height, width = array.shape
        image = Image.frombytes("P", (width, height), np.ascontiguousarray(array).tobytes())
        image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


def split_of(png: bytes, val_fraction: float) -> str:
    """Return ``train`` or ``val`` by curation's rule on the file's SHA-256 (see the module doc)."""
    digest = hashlib.sha256(png).hexdigest()
    return "val" if int(digest[8:16], 16) / 16**8 < val_fraction else "train"


def sa1b_document(scene: Scene, file_name: str, image_id: int) -> dict[str, Any]:
    """Describe a scene's visible objects as an SA-1B JSON document.

    The masks are ground truth, so ``predicted_iou`` and ``stability_score`` are 1.0; the point
    is each object's interior point and the crop box is the whole image.
    """
    height, width = scene.semantic.shape
    annotations = []
    for number, instance in enumerate(scene.instances, start=1):
        annotations.append(
            {
                "id": image_id * 1000 + number,
                "segmentation": encode_mask(instance.mask),
                "bbox": [float(value) for value in instance.bbox],
                "area": instance.area,
                "point_coords": [[instance.point[0], instance.point[1]]],
                "predicted_iou": 1.0,
                "stability_score": 1.0,
                "crop_box": [0.0, 0.0, float(width), float(height)],
            }
        )
    image = {"image_id": image_id, "width": width, "height": height, "file_name": file_name}
    return {"image": image, "annotations": annotations}


def ground_truth_record(scene: Scene, file_name: str, split: str) -> dict[str, Any]:
    """Describe one scene for ``ground_truth.jsonl``: what evaluation compares against."""
    return {
        "file": file_name,
        "index": scene.index,
        "split": split,
        "caption": scene.caption,
        "label": scene.label,
        "colour": scene.largest.colour,
        "background": scene.background,
        "objects": [
            {
                "instance": number,
                "class_name": instance.class_name,
                "class_index": instance.class_index,
                "colour": instance.colour,
                "bbox": list(instance.bbox),
                "area": instance.area,
                "full_area": instance.full_area,
                "point": list(instance.point),
            }
            for number, instance in enumerate(scene.instances, start=1)
        ],
    }


def _dumps(document: Any) -> str:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=True)


def _write_csv(path: Path, header: Sequence[str], rows: list[Sequence[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")


def _settings(count: int, seed: int, size: int, val_fraction: float, spec: SceneSpec) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "count": count,
        "seed": seed,
        "size": size,
        "val_fraction": val_fraction,
        "spec": dataclasses.asdict(spec),
    }


def _prepare_folder(root: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """Return True when `root` already contains this testbed; clear or reject anything else."""
    settings_path = root / SETTINGS_FILE
    if settings_path.is_file():
        stored = json.loads(settings_path.read_text(encoding="utf-8"))
        if stored.get("settings") == json.loads(json.dumps(settings)):
            return True
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise ValueError(
                f"{root} is not empty and contains no testbed with these settings; choose an empty "
                "folder, or pass overwrite=True (--overwrite) to replace the testbed files there"
            )
        for name in OUTPUTS:
            path = root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    return False


def write_testbed(
    root_dir: str | Path,
    count: int,
    seed: int,
    size: int = DEFAULT_SIZE,
    val_fraction: float = 0.2,
    spec: SceneSpec | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate scenes 0 .. count-1 of `seed` and write them under `root_dir` (local folder).

    A folder that already contains a finished testbed with the same settings is reused as it is.

    Returns the contents of ``testbed.json``: the settings and the counts per split, class and
    colour. Raises ValueError for invalid settings, or a non-empty folder without this testbed
    unless `overwrite` is set.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    spec = spec or SceneSpec()
    root = Path(root_dir)
    settings = _settings(count, seed, size, val_fraction, spec)
    if _prepare_folder(root, settings, overwrite):
        logger.info("reusing the testbed in %s (same settings)", root)
        return json.loads((root / SETTINGS_FILE).read_text(encoding="utf-8"))

    images_dir = root / "images"
    class_dir = root / "voc" / "SegmentationClass"
    object_dir = root / "voc" / "SegmentationObject"
    sets_dir = root / "voc" / "ImageSets" / "Segmentation"
    for folder in (images_dir, class_dir, object_dir, sets_dir):
        folder.mkdir(parents=True, exist_ok=True)
    palette = voc_palette()

    # scenes, one file set each
    captions, labels, colour_labels, records = [], [], [], []
    coco_images: list[dict[str, Any]] = []
    coco_annotations: list[dict[str, Any]] = []
    splits: dict[str, list[str]] = {"train": [], "val": []}
    started = last_log = time.perf_counter()
    for index in range(count):
        scene = generate_scene(seed, index, size, spec)
        stem = f"scene_{index:06d}"
        file_name = f"{stem}.png"
        png = encode_png(scene.image)
        split = split_of(png, val_fraction)

        (images_dir / file_name).write_bytes(png)
        document = sa1b_document(scene, file_name, image_id=index)
        (images_dir / f"{stem}.json").write_text(_dumps(document) + "\n", encoding="utf-8")
        (class_dir / file_name).write_bytes(encode_png(scene.semantic, palette))
        (object_dir / file_name).write_bytes(encode_png(scene.instance_map, palette))

        splits[split].append(stem)
        captions.append((file_name, scene.caption))
        labels.append((file_name, scene.label, scene.largest.colour))
        colour_labels.append((file_name, scene.largest.colour))
        records.append(ground_truth_record(scene, file_name, split))
        if split == "val":
            coco_images.append(document["image"] | {"id": index})
            for annotation, instance in zip(document["annotations"], scene.instances):
                coco_annotations.append({
                    "id": annotation["id"], "image_id": index, "category_id": instance.class_index,
                    "segmentation": annotation["segmentation"], "bbox": annotation["bbox"],
                    "area": annotation["area"], "iscrowd": 0,
                })  # fmt: skip

        now = time.perf_counter()
        if now - last_log >= PROGRESS_EVERY_S:
            last_log = now
            logger.info("wrote %d/%d scenes (%.1f scenes/s)", index + 1, count,
                        (index + 1) / (now - started))  # fmt: skip

    # tables and lists
    _write_csv(root / "captions.csv", ("file", "caption"), captions)
    _write_csv(root / "labels.csv", ("file", "label", "colour"), labels)
    val_files = {record["file"] for record in records if record["split"] == "val"}
    # relative to this file's folder, which is how evaluation tables name their images
    _write_csv(root / "labels_val.csv", ("file", "label", "colour"),
               [(f"images/{row[0]}", *row[1:]) for row in labels if row[0] in val_files])  # fmt: skip
    _write_csv(root / "colour_labels.csv", ("file", "label"), colour_labels)
    (root / "coco").mkdir(exist_ok=True)
    categories = [{"id": index, "name": name} for index, name in enumerate(CLASS_NAMES) if index > 0]
    coco = {"images": coco_images, "annotations": coco_annotations, "categories": categories}
    (root / "coco" / "instances_val.json").write_text(_dumps(coco) + "\n", encoding="utf-8")
    lines = "".join(_dumps(record) + "\n" for record in records)
    (root / "ground_truth.jsonl").write_text(lines, encoding="utf-8")
    for name, stems in (("train", splits["train"]), ("val", splits["val"]),
                        ("trainval", splits["train"] + splits["val"])):  # fmt: skip
        (sets_dir / f"{name}.txt").write_text("".join(f"{stem}\n" for stem in sorted(stems)))
    (root / "voc" / "classes.txt").write_text("".join(f"{name}\n" for name in CLASS_NAMES))

    # the settings file last: its presence marks a finished testbed
    summary = {
        "settings": settings,
        "classes": list(CLASS_NAMES),
        "counts": _counts(records),
    }
    (root / SETTINGS_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "wrote %d scenes (%d train, %d val) to %s in %.1f s",
        count, len(splits["train"]), len(splits["val"]), root, time.perf_counter() - started,
    )  # fmt: skip
    return summary


def _counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Count scenes per split and label, and objects per class and colour, sorted by name."""

    def tally(values: list[str]) -> dict[str, int]:
        return {name: values.count(name) for name in sorted(set(values))}

    objects = [item for record in records for item in record["objects"]]
    return {
        "scenes": len(records),
        "objects": len(objects),
        "split": tally([record["split"] for record in records]),
        "label": tally([record["label"] for record in records]),
        "object_class": tally([item["class_name"] for item in objects]),
        "object_colour": tally([item["colour"] for item in objects]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m samclip.testbed.writer --out DIR --count N --seed S``."""
    from samclip.logs import setup_logging

    parser = argparse.ArgumentParser(
        prog="python -m samclip.testbed.writer",
        description="Write a procedural testbed of coloured shapes with exact ground truth.",
    )
    parser.add_argument("--out", required=True, help="output folder (local path)")
    parser.add_argument("--count", type=int, required=True, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help=f"image side in pixels (default {DEFAULT_SIZE})")  # fmt: skip
    parser.add_argument(
        "--val-fraction", type=float, default=0.2,
        help="share of scenes in the val split, chosen by file hash (default 0.2)",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the testbed files in a non-empty --out folder")  # fmt: skip
    args = parser.parse_args(argv)

    setup_logging()
    try:
        summary = write_testbed(
            args.out, args.count, args.seed, args.size, args.val_fraction,
            overwrite=args.overwrite,
        )  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    print(json.dumps(summary["counts"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
