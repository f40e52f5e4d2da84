"""Training data: the driver's index of manifest rows and feature shards, and the workers' batches.

Only an index goes through the driver and Ray's object store: one row per image with ``hash``,
``uri``, the number of the feature shard that contains its CLIP (``clip_shard``) and SAM
(``sam_shard``, -1 where none exists) teacher embedding, and its row number (``position``).
The driver reads just the ``hash`` column of each shard to build it. Ray Data streams the index
to the workers (``get_dataset_shard``), each worker keeps its own rows (``train_sharding``),
reads their images and looks the embeddings up in the shard files itself (``FeatureLookup``),
so the feature bytes never pass through the driver.

NOTE: the index itself is built in the driver's memory and placed in the object store, at
roughly 160 bytes per image (an estimate: two hex hashes' worth of strings, two int32 and an
int64), so tens of millions of images need a driver with several GB of memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from samclip.tasks import storage
from samclip.tasks.train_steps import ClipBatch, SamBatch

# Decoded shards each worker keeps per feature folder. The index is sorted by shard, so the
# rows of one local-shuffle window come from a few neighbouring shards.
CACHED_SHARDS = 4


@dataclass(frozen=True)
class StageData:
    """Input locations of a stage: the curation manifest and the teachers' feature folders."""

    manifest_uri: str
    clip_features_dir: str
    sam_features_dir: str | None = None  # required by stage 2; elsewhere it adds val/sam metrics


@dataclass(frozen=True)
class FeatureSpec:
    """The dtype and per-row shape of one teacher's embeddings, and the shards that contain them."""

    dtype: str
    shape: tuple[int, ...]
    shards: tuple[str, ...] = ()  # shard URIs; the index's ``clip_shard``/``sam_shard`` count into it


@dataclass
class StageTables:
    """Index rows for one stage: ``train`` (CLIP batches), ``train_sam`` (SAM batches), ``val``."""

    train: pa.Table
    val: pa.Table
    train_sam: pa.Table | None
    clip_spec: FeatureSpec
    sam_spec: FeatureSpec | None
    counts: dict[str, int] = field(default_factory=dict)


def build_stage_tables(data: StageData, stage: int) -> StageTables:
    """Build the stage's index from the manifest's train and val rows and the feature shards.

    Every manifest row needs a CLIP feature (KeyError otherwise, naming the first missing
    hash). SAM features may cover a subset: SAM batches and val/sam metrics use the rows that
    have one. Stage 2 raises ValueError when no train row has a SAM feature.
    """
    manifest = storage.read_parquet(data.manifest_uri, columns=["hash", "uri", "split"]).to_pylist()
    manifest.sort(key=lambda row: row["hash"])
    train_rows = [row for row in manifest if row["split"] == "train"]
    val_rows = [row for row in manifest if row["split"] == "val"]
    if not train_rows:
        raise ValueError(
            f"manifest {data.manifest_uri} has no rows with split 'train': curate more images"
        )

    clip_spec, clip_shard_of = _shard_index(data.clip_features_dir)
    missing = [row["hash"] for row in manifest if row["hash"] not in clip_shard_of]
    if missing:
        raise KeyError(
            f"{len(missing)} of {len(manifest)} manifest hashes are not in {data.clip_features_dir} "
            f"(first: {missing[0]}); run precompute on the manifest that lists them"
        )
    sam_spec, sam_shard_of = None, {}
    if data.sam_features_dir is not None:
        sam_spec, sam_shard_of = _shard_index(data.sam_features_dir)

    sam_train_rows = [row for row in train_rows if row["hash"] in sam_shard_of]
    if stage == 2 and not sam_train_rows:
        raise ValueError(
            f"stage 2 needs SAM teacher features, but none of the {len(train_rows)} train images "
            f"has one in {data.sam_features_dir}: run precompute for the SAM teacher"
        )
    # val rows carry SAM shards only when every one has them, so each val batch is complete
    val_with_sam = bool(val_rows) and all(row["hash"] in sam_shard_of for row in val_rows)

    train = _index_table(train_rows, clip_shard_of, sam_shard_of, sort_by="clip_shard")
    train_sam = (
        _index_table(sam_train_rows, clip_shard_of, sam_shard_of, sort_by="sam_shard") if stage == 2 else None
    )
    val = _index_table(val_rows, clip_shard_of, sam_shard_of if val_with_sam else {}, sort_by="clip_shard")
    counts = {
        "train": len(train_rows),
        "train_sam": len(sam_train_rows) if stage == 2 else 0,
        "val": len(val_rows),
        "val_sam": len(val_rows) if val_with_sam else 0,
    }
    return StageTables(train, val, train_sam, clip_spec, sam_spec, counts)


def _shard_index(uri_dir: str) -> tuple[FeatureSpec | None, dict[str, int]]:
    """Read only the hash column of each shard: (spec with the shard list, hash -> shard number)."""
    from samclip.tasks.features import _check_layout, list_shards

    shards = list_shards(uri_dir)
    layout = None
    shard_of: dict[str, int] = {}
    for number, uri in enumerate(shards):
        table = storage.read_parquet(uri, columns=["hash"])
        layout = _check_layout(uri, table.schema, layout)
        for key in table.column("hash").to_pylist():
            shard_of.setdefault(key, number)
    if layout is None:
        return None, {}
    return FeatureSpec(layout.dtype, tuple(layout.shape), tuple(shards)), shard_of


def _index_table(
    rows: list[dict], clip_shard_of: dict[str, int], sam_shard_of: dict[str, int], sort_by: str
) -> pa.Table:
    table = pa.table({
        "hash": pa.array([row["hash"] for row in rows], pa.string()),
        "uri": pa.array([row["uri"] for row in rows], pa.string()),
        "clip_shard": pa.array([clip_shard_of[row["hash"]] for row in rows], pa.int32()),
        "sam_shard": pa.array([sam_shard_of.get(row["hash"], -1) for row in rows], pa.int32()),
    })
    table = table.sort_by([(sort_by, "ascending"), ("hash", "ascending")])
    # the row number after sorting, which train_sharding deals to ranks
    return table.append_column("position", pa.array(np.arange(len(table), dtype=np.int64)))


class FeatureLookup:
    """Look teacher embeddings up by hash in the shard files, keeping a few decoded shards."""

    def __init__(self, spec: FeatureSpec, cached_shards: int = CACHED_SHARDS) -> None:
        self.spec = spec
        self.cached_shards = cached_shards
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.shard_reads = 0  # shard files read so far, for tests and tuning

    def get(self, hashes: np.ndarray, shard_numbers: np.ndarray) -> torch.Tensor:
        """Return the embeddings of ``hashes`` as one float32 (N, *shape) tensor, in their order."""
        arrays = []
        for key, number in zip(hashes, shard_numbers):
            number = int(number)
            if number < 0:
                raise KeyError(f"image {key} has no feature in this teacher's shards")
            arrays.append(self._shard(number)[str(key)])
        return torch.from_numpy(np.stack(arrays).astype(np.float32))

    def _shard(self, number: int) -> dict[str, np.ndarray]:
        from samclip.tasks.features import FeatureLayout, decode_embeddings

        if number in self._cache:
            self._cache.move_to_end(number)
            return self._cache[number]
        uri = self.spec.shards[number]
        table = storage.read_parquet(uri)
        layout = FeatureLayout(self.spec.dtype, self.spec.shape)
        arrays = decode_embeddings(table.column("embedding"), layout, f"feature shard {uri}")
        rows = dict(zip(table.column("hash").to_pylist(), arrays))
        self.shard_reads += 1
        self._cache[number] = rows
        if len(self._cache) > self.cached_shards:
            self._cache.popitem(last=False)
        return rows


def load_images(uris: np.ndarray, max_pixels: int) -> list[np.ndarray]:
    """Read and decode each image through the storage layer: (H, W, 3) uint8 arrays."""
    from samclip.model.images import decode_image

    return [decode_image(storage.read_bytes(str(uri)), max_pixels=max_pixels) for uri in uris]


def make_clip_batch(
    rows: dict[str, np.ndarray], features: FeatureLookup, resolution: int, max_pixels: int
) -> ClipBatch:
    from samclip.model.images import batch_student_clip_inputs

    images = load_images(rows["uri"], max_pixels)
    inputs = batch_student_clip_inputs(images, resolution)
    return ClipBatch(images=inputs, targets=features.get(rows["hash"], rows["clip_shard"]))


def make_sam_batch(
    rows: dict[str, np.ndarray], features: FeatureLookup, resolution: int, max_pixels: int
) -> SamBatch:
    from samclip.model.images import batch_sam_inputs

    images, valid_hw = batch_sam_inputs(load_images(rows["uri"], max_pixels), resolution)
    embeddings = features.get(rows["hash"], rows["sam_shard"])
    return SamBatch(images=images, valid_hw=valid_hw, teacher_embeddings=embeddings)


def slice_rows(rows: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {name: values[start:stop] for name, values in rows.items()}
