"""The claims check on hand-made rows, the results file, and the CLIP teacher behind the student interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samclip.tasks.claims import (
    BOX, CLS, SEG, TEXTSEG, ClipTeacherAsStudent, check_claims, claims_markdown, plot_claims,
    teacher_training_note,
)  # fmt: skip


def _rows(naive_box=0.60, merged=None, wise=((0.70, 0.55),)):
    merged = merged or {CLS: 0.78, SEG: 0.30, TEXTSEG: 0.55, BOX: 0.79}
    rows = [
        {"model": "CLIP teacher", "kind": "clip-teacher", "metrics": {CLS: 0.85, SEG: 0.25}},
        {"model": "SAM teacher", "kind": "sam-teacher", "metrics": {BOX: 0.80}},
        {"model": "SAM teacher + probed head", "kind": "reference", "metrics": {CLS: 0.40, SEG: 0.2, TEXTSEG: 0.3, BOX: 0.80}},
        {"model": "naive distillation", "kind": "naive", "metrics": {CLS: 0.80, SEG: 0.3, TEXTSEG: 0.4, BOX: naive_box}},
        {"model": "SAM-CLIP", "kind": "samclip", "metrics": merged},
    ]
    for index, (box, cls) in enumerate(wise):
        rows.insert(4, {"model": f"Wise-FT {index}", "kind": "wise-ft", "metrics": {CLS: cls, SEG: 0.2, TEXTSEG: 0.3, BOX: box}})
    return rows


def _verdicts(rows):
    return {item["claim"]: item["reproduced"] for item in check_claims(rows, chance=0.2)}


def test_every_claim_reproduces_on_rows_that_show_it():
    assert _verdicts(_rows()) == {1: True, 2: True, 3: True, 4: True, 5: True}


def test_claims_fail_when_the_numbers_say_otherwise():
    # naive distillation keeps the masks: claim 2 fails
    assert _verdicts(_rows(naive_box=0.85))[2] is False
    # SAM-CLIP loses 10% of the box IoU, and the CLIP head alone segments better than both heads
    merged = {CLS: 0.78, SEG: 0.60, TEXTSEG: 0.55, BOX: 0.72}
    verdicts = _verdicts(_rows(merged=merged))
    assert verdicts[3] is False
    assert verdicts[5] is False
    # a Wise-FT point that reaches both thresholds makes claim 4 fail
    assert _verdicts(_rows(wise=((0.79, 0.79),)))[4] is False


def test_results_file_and_plot(tmp_path):
    rows = _rows()
    claims = check_claims(rows, chance=0.2)
    text = claims_markdown(rows, claims, {"teachers": 12.0, "compare": 30.0}, "claims.png", ["a note"])
    assert "| SAM teacher | n/a | n/a | n/a | 0.800 |" in text
    assert "1. **reproduced**" in text
    assert "| compare | 30 |" in text
    png = plot_claims(rows, "title")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from samclip.model.clip_teacher import load_clip_teacher, write_random_clip

    folder = tmp_path_factory.mktemp("clip")
    name = write_random_clip(folder / "adapter-clip.json", folder / "adapter-clip.bin", seed=3)
    return load_clip_teacher(name, folder / "adapter-clip.bin", folder / "adapter-clip.json")


def test_adapter_embeds_like_the_teacher(tiny_clip):
    from samclip.model.clip_teacher import clip_input
    from samclip.model.images import student_clip_input

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (tiny_clip.image_size, tiny_clip.image_size, 3), dtype=np.uint8)
    adapter = ClipTeacherAsStudent(tiny_clip)
    through_adapter = adapter.clip_embedding(student_clip_input(image, tiny_clip.image_size)[None])
    direct = tiny_clip.encode_image(clip_input(image, tiny_clip)[None])
    assert torch.allclose(through_adapter, direct, atol=1e-4)


def test_adapter_patch_tokens_project_into_the_joint_space(tiny_clip):
    from samclip.model.images import student_clip_input

    adapter = ClipTeacherAsStudent(tiny_clip)
    side = tiny_clip.image_size
    grid = side // tiny_clip.model.visual.patch_size[0]
    image = np.full((side, side, 3), 128, np.uint8)
    patches = adapter.clip_patch_embeddings(student_clip_input(image, side)[None])
    assert patches.shape == (1, grid, grid, tiny_clip.embed_dim)
    assert tiny_clip.model.visual.output_tokens is False  # restored


RESNET_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _resnet_teacher(folder, name):
    """Save a random open_clip ModifiedResNet CLIP as config + weights and load it as a teacher."""
    import json

    import open_clip

    from samclip.model.clip_teacher import load_clip_teacher

    (folder / f"{name}.json").write_text(json.dumps(RESNET_CLIP))
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    torch.save(model.state_dict(), folder / f"{name}.bin")
    return load_clip_teacher(name, folder / f"{name}.bin", folder / f"{name}.json")


def test_adapter_reads_resnet_dense_features(tmp_path):
    from samclip.model.images import student_clip_input

    teacher = _resnet_teacher(tmp_path, "adapter-rn")
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    patches = ClipTeacherAsStudent(teacher).clip_patch_embeddings(student_clip_input(image, 64)[None])
    assert patches.shape == (1, 2, 2, 32)  # stride 32 at 64 px
    assert torch.isfinite(patches).all()


def test_resnet_dense_features_follow_the_input_resolution(tmp_path):
    from samclip.model.images import student_clip_input

    teacher = _resnet_teacher(tmp_path, "adapter-rn2")
    image = np.zeros((256, 256, 3), np.uint8)
    patches = ClipTeacherAsStudent(teacher).clip_patch_embeddings(student_clip_input(image, 256)[None])
    assert patches.shape == (1, 8, 8, 32)  # stride 32 at 256 px


def test_teacher_note_states_targets_and_whether_reached():
    clip = {
        "result": {"steps": 900, "class_accuracy": 0.813, "colour_accuracy": 1.0, "reached_targets": True,
                   "scene_class_accuracy": 0.54, "scene_colour_accuracy": 0.873},
        "key": {"settings": {"target_class_accuracy": 0.8, "target_colour_accuracy": 0.8}},
    }  # fmt: skip
    sam = {
        "result": {"steps": 1000, "box_iou": 0.739, "point_iou": 0.70, "reached_target": False},
        "key": {"settings": {"target_box_iou": 0.8}},
    }

    note = teacher_training_note({"clip": clip, "sam": sam})

    assert "CLIP after 900 steps: shape 0.813 and colour 1.000" in note
    assert "(targets 0.80 / 0.80, reached)" in note
    assert "by the largest object, shape 0.540 and colour 0.873" in note
    assert "box-prompted mask IoU 0.739 (target 0.80, NOT reached)" in note
    assert teacher_training_note({"clip": None, "sam": None}) == "The teachers' training records were not found."
