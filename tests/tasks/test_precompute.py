"""Teacher feature precompute: computed counts, reruns that compute nothing, new images."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from samclip.config import PipelineConfig
from samclip.model.clip_teacher import clip_input
from samclip.model.images import decode_image
from samclip.tasks import sources, storage
from samclip.tasks.curate import curate
from samclip.tasks.features import list_shards, read_features
from samclip.tasks.precompute import feature_fingerprint, precompute
from samclip.tasks.storage import TMP_PREFIX
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

    # rerun: nothing left to compute, no shard rewritten, stale temporary files removed
    shards = {kind: list_shards(uri) for kind, uri in first.features.items()}
    clip_folder = tmp_path / "run" / "features" / f"clip-{teachers.clip_fingerprint}"
    stale = clip_folder / f"{TMP_PREFIX}{uuid.uuid4().hex}-part-killed.parquet"
    fresh = clip_folder / f"{TMP_PREFIX}{uuid.uuid4().hex}-part-writing.parquet"
    for path in (stale, fresh):
        path.write_bytes(b"PAR1 cut off")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    again = precompute(config, manifest_uri, teachers)
    assert not stale.exists()
    assert fresh.exists()  # younger than storage.stale_temp_age_s: a writer may own it
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


@pytest.mark.slow
def test_precompute_bf16_writes_separate_folder(ray_cluster, config, tmp_path):
    _add_photos(tmp_path / "images", ["chelsea.png", "coffee.png"])
    teachers = ensure_teachers(config)
    manifest_uri = curate(config).manifest_uri
    fp32 = precompute(config, manifest_uri, teachers)

    settings = config.precompute.model_copy(update={"compute_dtype": "bfloat16"})
    bf16_config = config.model_copy(update={"precompute": settings})
    bf16 = precompute(bf16_config, manifest_uri, teachers)
    assert bf16.computed == {"clip": 2, "sam": 2}  # nothing reused from the float32 folders
    for kind in ("clip", "sam"):
        assert bf16.features[kind] != fp32.features[kind]
        assert bf16.fingerprints[kind] == feature_fingerprint(fp32.fingerprints[kind], "bfloat16")
        lineage = storage.read_json(f"{bf16.features[kind]}/teacher.json")
        assert lineage["compute_dtype"] == "bfloat16"
        assert lineage["fingerprint"] == bf16.fingerprints[kind]

        reference = read_features(fp32.features[kind])
        lowered = read_features(bf16.features[kind])
        assert lowered.keys() == reference.keys()
        for key, array in reference.items():
            exact = array.astype(np.float32)
            approximate = lowered[key].astype(np.float32)
            assert not np.array_equal(exact, approximate)  # bfloat16 really ran
            scale = float(np.abs(exact).max())
            assert float(np.abs(exact - approximate).max()) <= 0.05 * scale


def test_feature_fingerprint_depends_on_compute_dtype():
    assert feature_fingerprint("0123456789abcdef", "float32") == "0123456789abcdef"
    bf16 = feature_fingerprint("0123456789abcdef", "bfloat16")
    assert len(bf16) == 16
    assert bf16 != "0123456789abcdef"
    assert bf16 != feature_fingerprint("fedcba9876543210", "bfloat16")
