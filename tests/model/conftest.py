"""Model test fixtures: tiny random teachers, written once per session by the real writers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from segment_anything.modeling import Sam

from samclip.model.clip_teacher import ClipTeacher, load_clip_teacher, write_random_clip
from samclip.model.sam_teacher import load_sam_checkpoint, write_random_sam


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("teachers")


@pytest.fixture(scope="session")
def tiny_sam_path(teacher_dir: Path) -> Path:
    path = teacher_dir / "sam_tiny.pth"
    write_random_sam(path, variant="tiny", seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_sam(tiny_sam_path: Path) -> Sam:
    return load_sam_checkpoint(tiny_sam_path, "tiny")


@pytest.fixture(scope="session")
def tiny_clip_files(teacher_dir: Path) -> tuple[str, Path, Path]:
    config_path = teacher_dir / "samclip-tiny-clip.json"
    weights_path = teacher_dir / "samclip-tiny-clip.bin"
    model_name = write_random_clip(config_path, weights_path, seed=0)
    return model_name, weights_path, config_path


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_files: tuple[str, Path, Path]) -> ClipTeacher:
    model_name, weights_path, config_path = tiny_clip_files
    return load_clip_teacher(model_name, weights_path, config_path)


@pytest.fixture()
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)
