"""Readers of the dataset layouts people evaluate on, from any storage URI.

- Classification: an ImageFolder tree (``root/{class name}/{image}``, one folder per class), or
  a Parquet/CSV table with an image column (URI or path; relative paths are read from the
  table's folder) and a ``label`` column.
- Semantic segmentation, VOC style: ``JPEGImages/{id}.jpg`` and ``SegmentationClass/{id}.png``
  (palette or greyscale PNGs whose pixel values are class indices, 255 ignored), the class list
  in ``classes.txt`` (one name per line, index = line number) or else VOC's 21 classes, and an
  optional split file ``ImageSets/Segmentation/{split}.txt``.
- Instances, COCO style: an ``instances_*.json`` (images, annotations with polygon or RLE
  segmentations and xywh boxes, categories) and the folder of its images. Crowd annotations are
  skipped, as COCO's mask AP does for matching.

Images are decoded with ``samclip.model.images.decode_image``, the decoder of every other step.
Masks are read as raw indices, never through the RGB decoder.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from samclip.model.metrics import VOC_IGNORE_INDEX
from samclip.tasks import storage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IMAGE_COLUMNS = ("image", "uri", "path", "file", "filename", "image_uri", "image_path")
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


@dataclass
class ClassificationSet:
    """Images with one class each: ``items`` are (image URI, index into class_names)."""

    class_names: list[str]
    items: list[tuple[str, int]]


@dataclass
class SegmentationSet:
    """Images with a class-index mask each: ``items`` are (image URI, mask URI)."""

    class_names: list[str]
    items: list[tuple[str, str]]
    ignore_index: int = VOC_IGNORE_INDEX


@dataclass
class Instance:
    category_id: int
    box_xywh: tuple[float, float, float, float]  # COCO's (x, y, width, height) in pixels
    segmentation: Any  # polygons [[x0, y0, x1, y1, ...], ...] or an RLE dict


@dataclass
class InstanceImage:
    uri: str
    height: int
    width: int
    instances: list[Instance] = field(default_factory=list)


@dataclass
class InstanceSet:
    categories: dict[int, str]
    images: list[InstanceImage]


def load_image(uri: str, max_pixels: int | None = None) -> np.ndarray:
    """Read and decode one image to (H, W, 3) uint8 RGB."""
    from samclip.model.images import decode_image

    data = storage.read_bytes(uri)
    return decode_image(data, max_pixels) if max_pixels is not None else decode_image(data)


def _is_image(uri: str) -> bool:
    return uri.lower().endswith(IMAGE_SUFFIXES)


def read_image_folder(root: str) -> ClassificationSet:
    """Read ``root/{class}/{image}``; the classes are the sorted folder names.

    Images nested deeper keep the class of their top folder; files directly under root are
    ignored.
    """
    base = root.rstrip("/")
    items_by_class: dict[str, list[str]] = {}
    for uri in storage.list_files(base):
        relative = uri[len(base) :].lstrip("/")
        if "/" not in relative or not _is_image(uri):
            continue
        items_by_class.setdefault(relative.split("/", 1)[0], []).append(uri)
    if not items_by_class:
        raise ValueError(
            f"no images found in class folders under {root}; expected root/CLASS_NAME/IMAGE files "
            f"with one of the suffixes {IMAGE_SUFFIXES}"
        )
    class_names = sorted(items_by_class)
    items = [(uri, index) for index, name in enumerate(class_names) for uri in sorted(items_by_class[name])]
    return ClassificationSet(class_names, items)


def read_label_table(uri: str, image_column: str | None = None, label_column: str = "label") -> ClassificationSet:
    """Read a Parquet or CSV table of (image, label); the classes are the sorted distinct labels."""
    import pyarrow.csv as pacsv

    if uri.lower().endswith(".csv"):
        table = pacsv.read_csv(io.BytesIO(storage.read_bytes(uri)))
    else:
        table = storage.read_parquet(uri)
    columns = table.column_names
    if image_column is None:
        found = [name for name in IMAGE_COLUMNS if name in columns]
        if not found:
            raise ValueError(f"table {uri} has no image column; expected one of {IMAGE_COLUMNS}, got {columns}")
        image_column = found[0]
    for name in (image_column, label_column):
        if name not in columns:
            raise ValueError(f"table {uri} has no column {name!r}; its columns are {columns}")
    folder = uri.rsplit("/", 1)[0]
    rows = [
        (_resolve(folder, str(image)), str(label))
        for image, label in zip(table.column(image_column).to_pylist(), table.column(label_column).to_pylist())
        if image is not None and label is not None
    ]
    if not rows:
        raise ValueError(f"table {uri} has no row with both an image and a label")
    class_names = sorted({label for _, label in rows})
    index = {name: i for i, name in enumerate(class_names)}
    return ClassificationSet(class_names, [(image, index[label]) for image, label in rows])


def _resolve(folder: str, location: str) -> str:
    if "://" in location or location.startswith("/"):
        return location
    return storage.join(folder, location)


def read_voc(
    root: str, split: str | None = None, class_names: list[str] | None = None, images_uri: str | None = None
) -> SegmentationSet:
    """Read a VOC-style segmentation layout; see the module docstring for the folders.

    `images_uri` is the folder of the images when they do not sit in ``JPEGImages/`` of the root.
    """
    base = root.rstrip("/")
    images_folder = images_uri.rstrip("/") if images_uri else storage.join(base, "JPEGImages")
    if class_names is None:
        classes_uri = storage.join(base, "classes.txt")
        if storage.exists(classes_uri):
            class_names = [line.strip() for line in storage.read_bytes(classes_uri).decode().splitlines() if line.strip()]
        else:
            class_names = list(VOC_CLASSES)
    masks = {
        posixpath.splitext(uri.rsplit("/", 1)[-1])[0]: uri
        for uri in storage.list_files(storage.join(base, "SegmentationClass"), ".png")
    }
    images = {
        posixpath.splitext(uri.rsplit("/", 1)[-1])[0]: uri
        for uri in storage.list_files(images_folder)
        if _is_image(uri)
    }
    if split is not None:
        split_uri = storage.join(base, "ImageSets", "Segmentation", f"{split}.txt")
        ids = [line.strip() for line in storage.read_bytes(split_uri).decode().splitlines() if line.strip()]
    else:
        ids = sorted(set(masks) & set(images))
    missing = [i for i in ids if i not in masks or i not in images]
    if missing:
        raise ValueError(
            f"{len(missing)} ids of {root} lack an image in {images_folder} or a mask in "
            f"SegmentationClass/ (first: {missing[0]})"
        )
    if not ids:
        raise ValueError(f"no image has a mask under {root}: expected JPEGImages/ID.jpg with SegmentationClass/ID.png")
    return SegmentationSet(class_names, [(images[i], masks[i]) for i in ids])


def load_class_mask(uri: str) -> np.ndarray:
    """Read a palette or greyscale PNG as (H, W) uint8 class indices (the palette is not applied)."""
    from PIL import Image

    with Image.open(io.BytesIO(storage.read_bytes(uri))) as mask:
        if mask.mode not in ("P", "L", "I;16", "I"):
            raise ValueError(
                f"mask {uri} is a {mask.mode} image; expected a palette (P) or greyscale (L) PNG "
                "whose pixel values are class indices, as VOC's SegmentationClass masks are"
            )
        return np.asarray(mask).astype(np.int64)


def read_coco(annotations_uri: str, images_uri: str) -> InstanceSet:
    """Read COCO instance annotations and resolve each image's ``file_name`` under images_uri."""
    payload = storage.read_json(annotations_uri)
    for key in ("images", "annotations", "categories"):
        if key not in payload:
            raise ValueError(f"{annotations_uri} lacks the COCO key {key!r}; expected an instances_*.json file")
    categories = {int(c["id"]): str(c["name"]) for c in payload["categories"]}
    images = {
        int(record["id"]): InstanceImage(
            uri=_resolve(images_uri.rstrip("/"), record["file_name"]),
            height=int(record["height"]),
            width=int(record["width"]),
        )
        for record in payload["images"]
    }
    for annotation in payload["annotations"]:
        if annotation.get("iscrowd", 0):
            continue
        image = images.get(int(annotation["image_id"]))
        if image is None:
            raise ValueError(f"annotation {annotation.get('id')} names image {annotation['image_id']}, which is not listed")
        image.instances.append(
            Instance(int(annotation["category_id"]), tuple(annotation["bbox"]), annotation["segmentation"])
        )
    return InstanceSet(categories, [images[key] for key in sorted(images) if images[key].instances])


def instance_mask(instance: Instance, height: int, width: int) -> np.ndarray:
    """Rasterise one annotation's segmentation to an (H, W) bool mask.

    NOTE: polygons are filled with PIL, whose edge pixels can differ from pycocotools'
    rasteriser by about one pixel along the outline.
    """
    from PIL import Image, ImageDraw

    from samclip.model.rle import decode_mask

    segmentation = instance.segmentation
    if isinstance(segmentation, dict):
        return decode_mask(segmentation).astype(bool)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in segmentation:
        if len(polygon) >= 6:
            draw.polygon([float(v) for v in polygon], fill=1, outline=1)
    return np.asarray(canvas).astype(bool)
