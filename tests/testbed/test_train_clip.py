"""CLIP teacher training on testbed scenes: a few steps of a very small model."""

from __future__ import annotations

import json

import torch

from samclip.model.clip_teacher import load_clip_teacher
from samclip.testbed.train_clip import MODEL_NAME, ClipTrainConfig, _lr_at, train_clip

SMALL_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def test_train_clip_saves_loadable_teacher(tmp_path):
    config = ClipTrainConfig(
        train_scenes=24, single_object_fraction=0.25, eval_scenes=10, scene_size=48,
        batch_size=8, max_steps=3, warmup_steps=1, eval_every=2, threads=1,
        model_config=SMALL_CONFIG,
    )  # fmt: skip
    result = train_clip(config, tmp_path)

    assert result.steps == 3
    assert [entry["step"] for entry in result.history] == [2, 3]
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in result.history)
    assert 0.0 <= result.class_accuracy <= 1.0
    assert 0.0 <= result.colour_accuracy <= 1.0
    teacher = load_clip_teacher(MODEL_NAME, result.weights_path, result.config_path)
    assert teacher.embed_dim == 32
    assert teacher.image_size == 32
    report = json.loads((tmp_path / "train_clip.json").read_text())
    assert report["result"]["steps"] == 3
    assert report["config"]["model_config"] == SMALL_CONFIG


def test_lr_schedule_warmup_then_cosine():
    config = ClipTrainConfig(lr=1.0, warmup_steps=10, max_steps=110)
    assert _lr_at(0, config) == 0.1
    assert _lr_at(9, config) == 1.0
    assert abs(_lr_at(60, config) - 0.5) < 1e-9
    assert _lr_at(110, config) == 0.0
