"""SAM teacher training on testbed scenes: a few steps of the tiny variant."""

from __future__ import annotations

import json

import torch

from samclip.model.sam_teacher import load_sam_checkpoint
from samclip.testbed.train_sam import CHECKPOINT_NAME, SamTrainConfig, _batch, _objects, _lr_at, train_sam


def test_train_sam_saves_official_checkpoint(tmp_path):
    config = SamTrainConfig(
        train_scenes=6, eval_scenes=3, scene_size=64, batch_size=2, prompts_per_image=2,
        max_steps=3, warmup_steps=1, eval_every=2, threads=1,
    )  # fmt: skip
    result = train_sam(config, tmp_path)

    assert result.steps == 3
    assert [entry["step"] for entry in result.history] == [2, 3]
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in result.history)
    assert 0.0 <= result.box_iou <= 1.0
    assert 0.0 <= result.point_iou <= 1.0
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert {key.split(".")[0] for key in saved} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    load_sam_checkpoint(tmp_path / CHECKPOINT_NAME, "tiny")
    report = json.loads((tmp_path / "train_sam.json").read_text())
    assert report["result"]["box_iou"] == result.box_iou


def test_batch_targets_are_the_prompted_objects():
    config = SamTrainConfig(prompts_per_image=3, point_fraction=0.5, box_jitter=0.0)
    data = _objects(seed=5, count=2, size=64)
    pixels, prompts, targets = _batch(data, [0, 1], config, 256, torch.Generator().manual_seed(0))

    assert pixels.shape == (2, 3, 256, 256)
    assert targets.shape == (2, 3, 64, 64)
    scale = 256 / 64
    for row in range(2):
        for slot in range(3):
            target = targets[row, slot].bool()
            if prompts.point_labels[row, slot, 0] == 1:
                x, y = (prompts.points[row, slot, 0] / scale).long().tolist()
                assert target[y, x], "a point prompt must lie inside its target mask"
            else:
                ys, xs = torch.nonzero(target, as_tuple=True)
                box = prompts.boxes[row, slot] / scale
                assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_lr_warmup_then_cosine_to_a_tenth():
    config = SamTrainConfig(lr=1.0, warmup_steps=10, max_steps=110)
    assert _lr_at(0, config) == 0.1
    assert _lr_at(9, config) == 1.0
    assert abs(_lr_at(110, config) - 0.1) < 1e-9
