"""Teacher feature precompute: computed counts, reruns that compute nothing, new images."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from samclip.config import PipelineConfig
from samclip.model.clip_teacher import clip_input
from samclip.model.images import decode_image
from samclip.tasks import sources
from samclip.tasks.curate import curate
from samclip.tasks.features import list_shards, read_features
from samclip.tasks.precompute import precompute
from samclip.tasks.teachers import ensure_teachers, load_clip_teacher_from


@pytest.fixture()
def config(tmp_path) -> PipelineConfig:
    folder = tmp_path / "images"
    folder.mkdir()
    return PipelineConfig.model_validate(
        {
            "storage": {"root": str(tmp_path / "run")},
            "ray": {"num_cpus": 2},
            "data": {"source": str(folder)},
            "precompute": {"batch_size": 3, "rows_per_shard": 4, "actors": 1, "cpus_per_actor": 1},
        }
    )


def _add_photos(folder, names: list[str]) -> None:
    paths = {photo.file: path for photo, path in sources.available_photos()}
    for name in names:
        shutil.copy(paths[name], folder / name)


def test_precompute_then_rerun_then_new_images(ray_cluster, config, tmp_path):
    folder = tmp_path / "images"
    photos = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "coins.png", "camera.png"]
    _add_photos(folder, photos)
    teachers = ensure_teachers(config)

    # first run: every image is computed
    manifest_uri = curate(config).manifest_uri
    first = precompute(config, manifest_uri, teachers)
    assert first.computed == {"clip": 6, "sam": 6}
    assert first.reused == {"clip": 0, "sam": 0}
    assert first.features["clip"].endswith(f"features/clip-{teachers.clip_fingerprint}")
    assert first.features["sam"].endswith(f"features/sam-{teachers.sam_fingerprint}")

    hashes = pq.read_table(manifest_uri).column("hash").to_pylist()
    clip = read_features(first.features["clip"], hashes)
    sam = read_features(first.features["sam"], hashes)
    for key in hashes:
        assert clip[key].shape == (256,)
        assert clip[key].dtype == np.float16
        assert sam[key].shape == (128, 16, 16)
        assert sam[key].dtype == np.float16
        assert np.isfinite(clip[key]).all()
        assert np.isfinite(sam[key]).all()
    assert all(len(pq.read_table(uri)) <= 4 for uri in list_shards(first.features["sam"]))

    # the stored CLIP feature is the teacher's embedding, up to float16 rounding
    data = (folder / "chelsea.png").read_bytes()
    teacher = load_clip_teacher_from(teachers)
    with torch.inference_mode():
        expected = teacher.encode_image(clip_input(decode_image(data), teacher)[None])[0].numpy()
    stored = clip[hashlib.sha256(data).hexdigest()].astype(np.float32)
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3)

    # rerun: nothing left to compute, no shard rewritten
    shards = {kind: list_shards(uri) for kind, uri in first.features.items()}
    again = precompute(config, manifest_uri, teachers)
    assert again.computed == {"clip": 0, "sam": 0}
    assert again.reused == {"clip": 6, "sam": 6}
    assert {kind: list_shards(uri) for kind, uri in again.features.items()} == shards

    # new images: only they are computed
    _add_photos(folder, ["hubble_deep_field.jpg", "clock_motion.png"])
    manifest_uri = curate(config).manifest_uri
    grown = precompute(config, manifest_uri, teachers)
    assert grown.computed == {"clip": 2, "sam": 2}
    assert grown.reused == {"clip": 6, "sam": 6}
    assert len(read_features(grown.features["clip"])) == 8


def test_precompute_rejects_pool_larger_than_cluster(ray_cluster, config, tmp_path):
    _add_photos(tmp_path / "images", ["chelsea.png"])
    manifest_uri = curate(config).manifest_uri
    settings = config.precompute.model_copy(update={"actors": 2})
    too_big = config.model_copy(update={"precompute": settings})
    with pytest.raises(ValueError, match="lower precompute.actors"):
        precompute(too_big, manifest_uri)
