"""Teacher files: random smoke teachers written once, fingerprints, clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from samclip.config import PipelineConfig
from samclip.tasks import teachers as teacher_files


def _config(root, **teachers) -> PipelineConfig:
    return PipelineConfig.model_validate({"storage": {"root": str(root)}, "teachers": teachers})


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    config = _config(root)
    return config, teacher_files.ensure_teachers(config)


def test_random_teachers_written_once(written):
    config, files = written
    paths = [files.sam_checkpoint, files.clip_weights, files.clip_model_config]
    for path in paths:
        assert os.path.isfile(path)
    assert files.sam_checkpoint == config.resolve_uri("{root}/teachers/sam_tiny.pth")
    mtimes = [os.stat(path).st_mtime_ns for path in paths]

    again = teacher_files.ensure_teachers(config)

    assert [os.stat(path).st_mtime_ns for path in paths] == mtimes
    assert again.sam_fingerprint == files.sam_fingerprint
    assert again.clip_fingerprint == files.clip_fingerprint
    assert len(files.sam_fingerprint) == 16
    assert files.sam_fingerprint != files.clip_fingerprint


def test_random_teachers_deterministic(written, tmp_path):
    _, files = written
    other = teacher_files.ensure_teachers(_config(tmp_path))
    assert other.sam_fingerprint == files.sam_fingerprint
    assert other.clip_fingerprint == files.clip_fingerprint


def test_seed_changes_fingerprints(written, tmp_path):
    _, files = written
    config = PipelineConfig.model_validate(
        {"storage": {"root": str(tmp_path)}, "teachers": {"seed": 1}}
    )
    other = teacher_files.ensure_teachers(config)
    assert other.sam_fingerprint != files.sam_fingerprint
    assert other.clip_fingerprint != files.clip_fingerprint


def test_teachers_load_and_encode(written):
    _, files = written
    sam = teacher_files.load_sam_teacher(files)
    clip = teacher_files.load_clip_teacher_from(files)
    with torch.inference_mode():
        sam_embedding = sam.image_encoder(torch.zeros(1, 3, 256, 256))
        clip_embedding = clip.encode_image(torch.zeros(1, 3, 224, 224))
    assert tuple(sam_embedding.shape[1:]) == files.sam_embedding_shape == (128, 16, 16)
    assert tuple(clip_embedding.shape) == (1, files.clip_embed_dim) == (1, 256)


def test_missing_sam_without_create_random(tmp_path):
    config = _config(tmp_path, sam={"create_random": False})
    with pytest.raises(ValueError, match="sam_tiny.pth.*teachers.sam.checkpoint"):
        teacher_files.ensure_teachers(config)


def test_missing_clip_without_create_random(written, tmp_path):
    root_config, files = written
    config = _config(
        tmp_path,
        sam={"checkpoint": files.sam_checkpoint_uri},
        clip={"create_random": False},
    )
    with pytest.raises(ValueError, match="samclip-tiny-clip.bin.*teachers.clip.weights"):
        teacher_files.ensure_teachers(config)


def test_missing_clip_config_with_weights(written, tmp_path):
    _, files = written
    config = _config(
        tmp_path,
        sam={"checkpoint": files.sam_checkpoint_uri},
        clip={"weights": files.clip_weights_uri},
    )
    with pytest.raises(ValueError, match="CLIP model config not found"):
        teacher_files.ensure_teachers(config)
