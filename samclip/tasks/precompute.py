"""Precompute frozen-teacher features for a curated manifest with Ray Data actor pools.

For each teacher the features go to ``{features_root}/{kind}-{fingerprint}/`` (see
``samclip.tasks.features``), where the fingerprint is the teacher's, extended with
``precompute.compute_dtype`` when that is not float32 (``feature_fingerprint``). Only images
whose hash is not in that folder yet are encoded, so a rerun computes nothing, new images cost
only themselves, and another run with the same teachers reuses every feature already there.

Per teacher, one Ray Data pipeline streams four stages:

1. the manifest rows still missing, in blocks of ``batch_size`` rows;
2. decode tasks of ``decode_cpus`` CPUs each: every image is read, checked against its
   manifest hash and decoded with ``decode_image``. They run beside the encoders, so decoding
   the next batch overlaps with embedding this one;
3. an actor pool of ``actors`` encoders, each loading the teacher once in ``__init__`` and
   embedding each batch under ``torch.inference_mode``;
4. a shard writer: each batch of up to ``rows_per_shard`` rows becomes one shard, committed
   atomically, so an interrupted run keeps every shard it finished.

Embeddings: CLIP, the (D,) image embedding before normalisation; SAM, the (C, h, w) output of
the image encoder.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from samclip.config import PipelineConfig
from samclip.tasks import storage
from samclip.tasks.features import (
    FeatureLayout,
    decode_embeddings,
    encode_embeddings,
    read_feature_hashes,
    write_feature_shard,
)
from samclip.tasks.ray_cluster import init_ray
from samclip.tasks.teachers import (
    TeacherFiles,
    ensure_teachers,
    fingerprint,
    load_clip_teacher_from,
    load_sam_teacher,
)

logger = logging.getLogger(__name__)

KINDS = ("clip", "sam")
# CPUs reserved for each shard-writer task: writing is I/O, and it must fit beside a full
# actor pool, because a stage that cannot be scheduled makes Ray Data wait forever.
WRITER_CPUS = 0.25
MAX_BLOCKS = 10_000
PROGRESS_EVERY_S = 10.0
LINEAGE_FILE = "teacher.json"


@dataclass
class PrecomputeResult:
    """Feature folders per teacher kind, with what this run computed and what it reused."""

    features: dict[str, str]  # kind -> feature folder URI
    computed: dict[str, int]
    reused: dict[str, int]
    seconds: float
    fingerprints: dict[str, str] = field(default_factory=dict)
    images_per_second: dict[str, float] = field(default_factory=dict)


def precompute(
    config: PipelineConfig, manifest_uri: str, teachers: TeacherFiles | None = None
) -> PrecomputeResult:
    """Compute the CLIP and SAM teacher features missing for the images of a manifest."""
    started = time.perf_counter()
    storage.configure_endpoint(config.storage.endpoint_url)
    teachers = teachers or ensure_teachers(config)

    manifest = storage.read_parquet(manifest_uri, columns=["hash", "uri"]).to_pylist()
    unique = {row["hash"]: row["uri"] for row in manifest}
    logger.info("precompute: %d images in %s", len(unique), manifest_uri)

    init_ray(config.ray)
    _check_resources(config)

    result = PrecomputeResult(features={}, computed={}, reused={}, seconds=0.0)
    for kind in KINDS:
        fingerprint = feature_fingerprint(
            teachers.clip_fingerprint if kind == "clip" else teachers.sam_fingerprint,
            config.precompute.compute_dtype,
        )
        features_root = config.resolve_uri(config.precompute.features_root)
        folder = storage.join(features_root, f"{kind}-{fingerprint}")
        layout = feature_layout(kind, teachers, config.precompute.dtype)
        storage.remove_stale_temp_files(folder, config.storage.stale_temp_age_s)
        present = read_feature_hashes(folder, expected=layout)
        missing = [
            {"hash": key, "uri": uri} for key, uri in sorted(unique.items()) if key not in present
        ]
        _write_lineage(folder, kind, teachers, layout, config.precompute.compute_dtype)

        kind_started = time.perf_counter()
        computed = _run_teacher(config, kind, teachers, folder, layout, missing) if missing else 0
        elapsed = time.perf_counter() - kind_started

        result.features[kind] = folder
        result.fingerprints[kind] = fingerprint
        result.computed[kind] = computed
        result.reused[kind] = len(unique) - len(missing)
        result.images_per_second[kind] = round(computed / elapsed, 2) if computed else 0.0
        logger.info(
            "%s features: %d computed (%.1f images/s, actor start-up included), %d reused, in %s",
            kind, computed, result.images_per_second[kind], result.reused[kind], folder,
        )

    result.seconds = round(time.perf_counter() - started, 3)
    return result


def feature_fingerprint(teacher_fingerprint: str, compute_dtype: str) -> str:
    """Return the fingerprint that names a feature folder: the teacher's, plus the compute dtype.

    float32 keeps the bare teacher fingerprint, so folders written before the compute dtype
    was configurable stay valid. Any other dtype hashes both into a new fingerprint.
    """
    if compute_dtype == "float32":
        return teacher_fingerprint
    return fingerprint({"teacher": teacher_fingerprint, "compute_dtype": compute_dtype})


def feature_layout(kind: str, teachers: TeacherFiles, dtype: str) -> FeatureLayout:
    """Return the stored dtype and per-image shape of one teacher's features."""
    if kind == "clip":
        return FeatureLayout(dtype=dtype, shape=(teachers.clip_embed_dim,))
    if kind == "sam":
        return FeatureLayout(dtype=dtype, shape=teachers.sam_embedding_shape)
    raise ValueError(f"unknown feature kind {kind!r}; expected one of {KINDS}")


def decode_batch(
    batch: pa.Table, decode_limits: dict[str, Any], endpoint_url: str | None
) -> dict[str, np.ndarray]:
    """Read, hash-check and decode the image of each manifest row (a Ray Data task).

    Returns ``hash`` and ``image``: (H, W, 3) uint8 arrays, whose sizes may differ.
    """
    storage.configure_endpoint(endpoint_url)
    hashes = batch.column("hash").to_pylist()
    uris = batch.column("uri").to_pylist()
    images = np.empty(len(hashes), dtype=object)  # an object array keeps ragged shapes apart
    for index, (key, uri) in enumerate(zip(hashes, uris, strict=True)):
        images[index] = _read_image(key, uri, decode_limits)
    return {"hash": np.asarray(hashes, dtype=object), "image": images}


def _read_image(key: str, uri: str, decode_limits: dict[str, Any]) -> np.ndarray:
    from samclip.model.images import decode_image

    data = storage.read_bytes(uri)
    digest = hashlib.sha256(data).hexdigest()
    if digest != key:
        # The feature would be stored under a hash that no longer describes the file.
        raise ValueError(
            f"{uri} changed since curation: the manifest has sha256 {key}, the file has "
            f"{digest}; rerun curate before precompute"
        )
    return decode_image(data, **decode_limits)


class TeacherEncoder:
    """Ray Data actor: embed a batch of decoded images (``decode_batch``) with one frozen teacher.

    Returns a table of ``hash`` and ``embedding`` (raw bytes in the storage dtype).
    """

    def __init__(
        self,
        kind: str,
        teachers: TeacherFiles,
        layout: FeatureLayout,
        num_threads: int,
        endpoint_url: str | None,
        compute_dtype: str = "float32",
    ) -> None:
        import torch

        storage.configure_endpoint(endpoint_url)
        torch.set_num_threads(num_threads)
        self.kind = kind
        self.layout = layout
        self.compute_dtype = compute_dtype
        if kind == "clip":
            self.teacher = load_clip_teacher_from(teachers)
            self.device_type = next(self.teacher.parameters()).device.type
        else:
            self.sam = load_sam_teacher(teachers)
            self.sam_size = int(self.sam.image_encoder.img_size)
            self.device_type = next(self.sam.parameters()).device.type

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        hashes = [str(key) for key in batch["hash"]]
        # Ray Data gives ragged images as an object array and equal-sized ones as one
        # (B, H, W, 3) array. Both iterate as (H, W, 3) images.
        images = list(batch["image"])
        with torch.inference_mode(), self._autocast():
            embeddings = self._encode(images).float().cpu().numpy()  # (B, *shape)
        if embeddings.shape[1:] != self.layout.shape:
            raise RuntimeError(
                f"{self.kind} teacher returned embeddings of shape {embeddings.shape[1:]}, "
                f"expected {self.layout.shape}"
            )
        arrays = embeddings.astype(self.layout.dtype)
        return pa.table(
            {
                "hash": pa.array(hashes, pa.string()),
                "embedding": encode_embeddings(arrays, self.layout),
            }
        )

    def _autocast(self):
        """Return torch.autocast for bfloat16 on the teacher's device, or a no-op for float32."""
        import torch

        if self.compute_dtype == "float32":
            return contextlib.nullcontext()
        dtype = getattr(torch, self.compute_dtype)
        return torch.autocast(device_type=self.device_type, dtype=dtype)

    def _encode(self, images: list[np.ndarray]):
        import torch

        if self.kind == "clip":
            from samclip.model.clip_teacher import clip_input

            inputs = torch.stack([clip_input(image, self.teacher) for image in images])
            # inputs: (B, 3, S, S)
            return self.teacher.encode_image(inputs)  # (B, D)
        from samclip.model.images import batch_sam_inputs

        inputs, _ = batch_sam_inputs(images, self.sam_size)  # (B, 3, S, S)
        return self.sam.image_encoder(inputs)  # (B, C, h, w)


def write_shard(
    batch: pa.Table, folder: str, layout: FeatureLayout, endpoint_url: str | None
) -> pa.Table:
    """Commit one batch of embeddings as one feature shard (a Ray Data task).

    Returns a one-row table of the shard's URI and row count.
    """
    storage.configure_endpoint(endpoint_url)
    hashes = batch.column("hash").to_pylist()
    arrays = decode_embeddings(batch.column("embedding"), layout, "encoder output")
    uri = write_feature_shard(folder, hashes, arrays, layout.dtype, layout.shape)
    return pa.table({"shard": [uri], "rows": [len(hashes)]})


def _run_teacher(
    config: PipelineConfig,
    kind: str,
    teachers: TeacherFiles,
    folder: str,
    layout: FeatureLayout,
    missing: list[dict[str, str]],
) -> int:
    import ray

    settings = config.precompute
    blocks = max(1, min(MAX_BLOCKS, math.ceil(len(missing) / settings.batch_size)))
    logger.info(
        "%s: encoding %d images with %d actor(s) of %.2f CPUs, batches of %d, decode tasks of "
        "%.2f CPUs",
        kind, len(missing), settings.actors, settings.cpus_per_actor, settings.batch_size,
        settings.decode_cpus,
    )
    dataset = ray.data.from_items(missing, override_num_blocks=blocks)
    # Its own CPU request keeps Ray Data from fusing this stage into the encoder actors.
    dataset = dataset.map_batches(
        decode_batch,
        fn_kwargs={
            "decode_limits": {
                "max_pixels": config.data.max_pixels,
                "min_side": config.data.min_side,
                "max_aspect": config.data.max_aspect,
            },
            "endpoint_url": config.storage.endpoint_url,
        },
        batch_size=settings.batch_size,
        batch_format="pyarrow",
        num_cpus=settings.decode_cpus,
        **storage.ray_remote_args(),
    )
    dataset = dataset.map_batches(
        TeacherEncoder,
        fn_constructor_kwargs={
            "kind": kind,
            "teachers": teachers,
            "layout": layout,
            "num_threads": max(1, int(settings.cpus_per_actor)),
            "endpoint_url": config.storage.endpoint_url,
            "compute_dtype": settings.compute_dtype,
        },
        compute=ray.data.ActorPoolStrategy(size=settings.actors),
        num_cpus=settings.cpus_per_actor,
        batch_size=settings.batch_size,
        batch_format="numpy",
        **storage.ray_remote_args(),
    )
    dataset = dataset.map_batches(
        write_shard,
        fn_kwargs={"folder": folder, "layout": layout, "endpoint_url": config.storage.endpoint_url},
        batch_size=settings.rows_per_shard,
        batch_format="pyarrow",
        num_cpus=WRITER_CPUS,
        **storage.ray_remote_args(),
    )

    started = last_log = time.perf_counter()
    written = shards = 0
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        written += sum(batch.column("rows").to_pylist())
        shards += batch.num_rows
        now = time.perf_counter()
        if now - last_log >= PROGRESS_EVERY_S:
            last_log = now
            logger.info(
                "%s: %d/%d images in %d shards (%.1f images/s)",
                kind, written, len(missing), shards, written / (now - started),
            )
    if written != len(missing):
        raise RuntimeError(f"{kind}: wrote {written} features for {len(missing)} missing images")
    return written


def _check_resources(config: PipelineConfig) -> None:
    """Reject an actor pool that leaves no CPU for a decode task and the shard writers.

    Ray Data waits forever for a stage that cannot be scheduled, so this raises instead.
    """
    import ray

    settings = config.precompute
    total = float(ray.cluster_resources().get("CPU", 0.0))
    needed = settings.actors * settings.cpus_per_actor + settings.decode_cpus + WRITER_CPUS
    if needed > total:
        raise ValueError(
            f"precompute needs {needed:g} CPUs ({settings.actors} actors x "
            f"{settings.cpus_per_actor:g} CPUs + {settings.decode_cpus:g} for a decode task + "
            f"{WRITER_CPUS:g} for shard writers) but the Ray cluster has {total:g}; lower "
            "precompute.actors, precompute.cpus_per_actor or precompute.decode_cpus"
        )


def _write_lineage(
    folder: str, kind: str, teachers: TeacherFiles, layout: FeatureLayout, compute_dtype: str
) -> None:
    """Record once what produced a feature folder, for readers other than this pipeline."""
    uri = storage.join(folder, LINEAGE_FILE)
    if storage.exists(uri):
        return
    inputs = teachers.clip_fingerprint_inputs if kind == "clip" else teachers.sam_fingerprint_inputs
    teacher = teachers.clip_fingerprint if kind == "clip" else teachers.sam_fingerprint
    storage.write_json(
        uri,
        {
            "kind": kind,
            "fingerprint": feature_fingerprint(teacher, compute_dtype),
            "teacher_fingerprint": teacher,
            "fingerprint_inputs": inputs,
            "compute_dtype": compute_dtype,
            "dtype": layout.dtype,
            "shape": list(layout.shape),
        },
    )
