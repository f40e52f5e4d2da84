"""Training data: the driver's join of manifest and teacher features, and the workers' batches.

The driver joins the curation manifest with the precomputed teacher features into Arrow tables
whose rows hold ``hash``, ``uri`` and the raw feature bytes (``clip``, and ``sam`` where the SAM
teacher's embedding exists). Ray Data ships them to the workers, which read and decode each
image, build the student's inputs and turn the bytes back into arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from samclip.tasks import storage
from samclip.tasks.train_steps import ClipBatch, SamBatch


@dataclass(frozen=True)
class StageData:
    """Input locations of a stage: the curation manifest and the teachers' feature folders."""

    manifest_uri: str
    clip_features_dir: str
    sam_features_dir: str | None = None  # required by stage 2; elsewhere it adds val/sam metrics


@dataclass(frozen=True)
class FeatureSpec:
    """dtype and per-row shape of one feature column's raw bytes."""

    dtype: str
    shape: tuple[int, ...]

    def decode(self, rows: np.ndarray) -> torch.Tensor:
        """Turn an object array of raw little-endian bytes into a float32 (N, *shape) tensor."""
        stored = np.dtype(self.dtype).newbyteorder("<")
        arrays = [np.frombuffer(row, dtype=stored).reshape(self.shape) for row in rows]
        return torch.from_numpy(np.stack(arrays).astype(np.float32))


@dataclass
class StageTables:
    """Rows for one stage: ``train`` (CLIP batches), ``train_sam`` (SAM batches), ``val``."""

    train: pa.Table
    val: pa.Table
    train_sam: pa.Table | None
    clip_spec: FeatureSpec
    sam_spec: FeatureSpec | None
    counts: dict[str, int] = field(default_factory=dict)


def build_stage_tables(data: StageData, stage: int) -> StageTables:
    """Join the manifest's train and val rows with their teacher features.

    Every manifest row needs a CLIP feature (KeyError otherwise, naming the first missing
    hash). SAM features may cover a subset: SAM batches and val/sam metrics use the rows that
    have one. Stage 2 raises ValueError when no train row has a SAM feature.

    NOTE: the join keeps every selected feature in the driver's memory and Ray's object store.
    A ViT-B SAM embedding (256 x 64 x 64 float16) is 2 MiB, so stage 2 at that size fits only a
    few thousand images this way; larger runs need a Ray Data join that streams the shards.
    """
    from samclip.tasks.features import read_feature_hashes, read_features

    manifest = storage.read_parquet(data.manifest_uri, columns=["hash", "uri", "split"]).to_pylist()
    manifest.sort(key=lambda row: row["hash"])
    train_rows = [row for row in manifest if row["split"] == "train"]
    val_rows = [row for row in manifest if row["split"] == "val"]
    if not train_rows:
        raise ValueError(
            f"manifest {data.manifest_uri} has no rows with split 'train': curate more images"
        )

    clip = read_features(data.clip_features_dir, [row["hash"] for row in manifest])
    clip_spec = _spec(clip, data.clip_features_dir)
    sam: dict[str, np.ndarray] = {}
    sam_spec = None
    if data.sam_features_dir is not None:
        present = read_feature_hashes(data.sam_features_dir)
        wanted = [row["hash"] for row in manifest if row["hash"] in present]
        sam = read_features(data.sam_features_dir, wanted)
        sam_spec = _spec(sam, data.sam_features_dir) if sam else None

    train = _table(train_rows, clip, None)
    train_sam = None
    sam_train_rows = [row for row in train_rows if row["hash"] in sam]
    if stage == 2:
        if not sam_train_rows:
            raise ValueError(
                f"stage 2 needs SAM teacher features, but none of the {len(train_rows)} train images "
                f"has one in {data.sam_features_dir}: run precompute for the SAM teacher"
            )
        train_sam = _table(sam_train_rows, None, sam)
    sam_val_rows = [row for row in val_rows if row["hash"] in sam]
    # val rows carry SAM bytes only when every one has them, so each val batch is complete
    val_with_sam = bool(val_rows) and len(sam_val_rows) == len(val_rows)
    val = _table(val_rows, clip, sam if val_with_sam else None)
    counts = {
        "train": len(train_rows),
        "train_sam": len(sam_train_rows) if stage == 2 else 0,
        "val": len(val_rows),
        "val_sam": len(val_rows) if val_with_sam else 0,
    }
    return StageTables(train, val, train_sam, clip_spec, sam_spec, counts)


def _spec(features: dict[str, np.ndarray], source: str) -> FeatureSpec:
    first = next(iter(features.values()), None)
    if first is None:
        raise ValueError(f"no features found in {source}: run precompute first")
    return FeatureSpec(dtype=str(first.dtype), shape=tuple(int(s) for s in first.shape))


def _table(
    rows: list[dict], clip: dict[str, np.ndarray] | None, sam: dict[str, np.ndarray] | None
) -> pa.Table:
    columns: dict[str, pa.Array] = {
        "hash": pa.array([row["hash"] for row in rows], pa.string()),
        "uri": pa.array([row["uri"] for row in rows], pa.string()),
    }
    for name, features in (("clip", clip), ("sam", sam)):
        if features is not None:
            raw = [_little_endian_bytes(features[row["hash"]]) for row in rows]
            columns[name] = pa.array(raw, pa.binary())
    return pa.table(columns)


def _little_endian_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def load_images(uris: np.ndarray, max_pixels: int) -> list[np.ndarray]:
    """Read and decode each image through the storage layer: (H, W, 3) uint8 arrays."""
    from samclip.model.images import decode_image

    return [decode_image(storage.read_bytes(str(uri)), max_pixels=max_pixels) for uri in uris]


def make_clip_batch(
    rows: dict[str, np.ndarray], spec: FeatureSpec, resolution: int, max_pixels: int
) -> ClipBatch:
    from samclip.model.images import batch_student_clip_inputs

    images = load_images(rows["uri"], max_pixels)
    inputs = batch_student_clip_inputs(images, resolution)
    return ClipBatch(images=inputs, targets=spec.decode(rows["clip"]))


def make_sam_batch(
    rows: dict[str, np.ndarray], spec: FeatureSpec, resolution: int, max_pixels: int
) -> SamBatch:
    from samclip.model.images import batch_sam_inputs

    images, valid_hw = batch_sam_inputs(load_images(rows["uri"], max_pixels), resolution)
    return SamBatch(images=images, valid_hw=valid_hw, teacher_embeddings=spec.decode(rows["sam"]))


def slice_rows(rows: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {name: values[start:stop] for name, values in rows.items()}
