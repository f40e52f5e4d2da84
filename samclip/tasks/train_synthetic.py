"""Synthetic stage inputs for tests and benchmarks: images, a manifest and teacher features.

The files use the documented formats, so ``run_stage`` reads them like real curated data.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import torch

from samclip.config import PipelineConfig
from samclip.tasks import storage
from samclip.tasks.train_data import StageData


def write_synthetic_stage_data(
    root: str, config: PipelineConfig, n_train: int = 4, n_val: int = 2, clip_dim: int = 32
) -> StageData:
    """Write images, a manifest and teacher features in the documented formats; returns StageData.

    The SAM features are the real SAM teacher's image-encoder embeddings, so a student whose SAM
    parts equal the teacher's reproduces its masks. The CLIP features are random vectors.
    """
    import pyarrow as pa
    from PIL import Image

    from samclip.model.images import batch_sam_inputs, decode_image
    from samclip.model.sam_teacher import get_sam_arch
    from samclip.tasks.features import write_feature_shard
    from samclip.tasks.teachers import ensure_teachers, load_sam_teacher

    rng = np.random.default_rng(0)
    rows, images = [], []
    for index in range(n_train + n_val):
        height, width = (96, 128) if index % 2 else (120, 90)
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None]
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        pixels[top : top + height // 3, left : left + width // 3] = rng.integers(0, 255, 3)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        uri = storage.join(root, "images", f"image-{index}.png")
        storage.write_bytes(uri, buffer.getvalue())
        images.append(decode_image(buffer.getvalue()))
        rows.append({
            "hash": hashlib.sha256(buffer.getvalue()).hexdigest(), "uri": uri, "width": width,
            "height": height, "split": "train" if index < n_train else "val", "label": None, "source": "test",
        })
    manifest_uri = storage.join(root, "curate", "manifest.parquet")
    storage.write_parquet(pa.Table.from_pylist(rows), manifest_uri)

    hashes = [row["hash"] for row in rows]
    clip_dir = storage.join(root, "features", "clip-test")
    clip_features = rng.standard_normal((len(rows), clip_dim)).astype(np.float16)
    write_feature_shard(clip_dir, hashes, clip_features, "float16")
    teacher = load_sam_teacher(ensure_teachers(config))
    inputs, _ = batch_sam_inputs(images, get_sam_arch(config.teachers.sam.variant).image_size)
    with torch.no_grad():
        embeddings = teacher.image_encoder(inputs).numpy().astype(np.float16)
    sam_dir = storage.join(root, "features", "sam-test")
    write_feature_shard(sam_dir, hashes, embeddings, "float16")
    return StageData(manifest_uri=manifest_uri, clip_features_dir=clip_dir, sam_features_dir=sam_dir)
