"""Text-prompted segmentation task and CLI, on a real photograph with a tiny random student."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samclip.cli import main
from samclip.tasks.segment import ClipTextEncoder, segment

PROMPTS = ["cat", "wall", "floor"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from skimage import data

    from samclip.model.architectures import build_student
    from samclip.model.clip_teacher import write_random_clip
    from samclip.model.sam_teacher import load_sam_checkpoint, write_random_sam
    from samclip.tasks.checkpoints import save_student_checkpoint, student_meta

    folder = tmp_path_factory.mktemp("segment")
    write_random_sam(folder / "sam.pth", "tiny", seed=0)
    model_name = write_random_clip(folder / "samclip-tiny-clip.json", folder / "clip.bin", seed=0)
    torch.manual_seed(0)
    student = build_student("tiny", load_sam_checkpoint(folder / "sam.pth", "tiny"), 256)
    save_student_checkpoint(str(folder / "student"), student, student_meta("tiny", 256))
    Image.fromarray(data.chelsea()).save(folder / "chelsea.png")
    return {
        "folder": str(folder),
        "checkpoint": str(folder / "student"),
        "image": str(folder / "chelsea.png"),
        "clip_model": model_name,
        "clip_weights": str(folder / "clip.bin"),
        "clip_config": str(folder / "samclip-tiny-clip.json"),
    }


def encoder(files) -> ClipTextEncoder:
    return ClipTextEncoder(files["clip_model"], files["clip_weights"], files["clip_config"])


def test_segment_writes_outputs(files, tmp_path: Path):
    outputs = segment(files["image"], PROMPTS, files["checkpoint"], str(tmp_path / "out"), text_encoder=encoder(files))
    overlay = Image.open(outputs.overlay_uri)
    assert overlay.format == "PNG"
    assert overlay.size[0] > 300
    arrays = np.load(outputs.masks_uri)
    assert arrays["labels"].shape == (300, 451)
    assert arrays["masks"].shape == (3, 300, 451)
    assert list(arrays["class_names"]) == PROMPTS
    assert np.array_equal(arrays["masks"].argmax(axis=0), arrays["labels"])
    label_map = np.asarray(Image.open(outputs.labels_uri))
    assert np.array_equal(label_map.astype(np.int16) - 1, arrays["labels"])
    assert sum(outputs.class_shares.values()) == pytest.approx(1.0)
    assert outputs.class_shares["background"] == 0.0


def test_background_threshold_option(files, tmp_path: Path):
    outputs = segment(
        files["image"], PROMPTS, files["checkpoint"], str(tmp_path / "out"),
        text_encoder=encoder(files), background_threshold=1.0,
    )  # fmt: skip
    assert outputs.class_shares["background"] == 1.0
    assert (np.asarray(Image.open(outputs.labels_uri)) == 0).all()


def test_cli_segment(files, tmp_path: Path, capsys):
    output = tmp_path / "cli"
    code = main([
        "segment", files["image"], "--prompt", "cat", "--prompt", "wall",
        "--model", files["checkpoint"], "--output", str(output),
        "--clip-model", files["clip_model"], "--clip-weights", files["clip_weights"],
        "--clip-config", files["clip_config"], "--points", "2",
    ])  # fmt: skip
    assert code == 0
    assert (output / "overlay.png").is_file()
    assert (output / "masks.npz").is_file()
    assert "overlay" in capsys.readouterr().out


def test_cli_rejects_half_teacher(files, tmp_path: Path):
    code = main([
        "segment", files["image"], "--prompt", "cat", "--model", files["checkpoint"],
        "--output", str(tmp_path), "--clip-model", files["clip_model"],
    ])  # fmt: skip
    assert code == 2


def test_missing_checkpoint_and_config(files, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not found"):
        segment(files["image"], PROMPTS, str(tmp_path / "none"), str(tmp_path / "out"), text_encoder=encoder(files))
    with pytest.raises(ValueError, match="config.yaml"):
        segment(files["image"], PROMPTS, files["checkpoint"], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no text prompts"):
        segment(files["image"], [" "], files["checkpoint"], str(tmp_path / "out"), text_encoder=encoder(files))


def test_teacher_dimension_mismatch(files, tmp_path: Path):
    from samclip.model.architectures import build_student_random
    from samclip.tasks.checkpoints import save_student_checkpoint, student_meta

    folder = str(tmp_path / "narrow")
    save_student_checkpoint(folder, build_student_random("tiny", 32), student_meta("tiny", 32))
    with pytest.raises(ValueError, match="embeds into 256"):
        segment(files["image"], PROMPTS, folder, str(tmp_path / "out"), text_encoder=encoder(files))
