from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import Sam

from samclip.model.architectures import build_student
from samclip.model.baselines import naive_distillation_loss, setup_naive_distillation, wise_ft
from samclip.model.sam_teacher import build_sam
from samclip.model.student import SamClip


@pytest.fixture()
def student(tiny_sam: Sam) -> SamClip:
    torch.manual_seed(0)
    return build_student("tiny", tiny_sam, 256)


def test_naive_setup_trains_backbone_and_clip_head(student):
    setup = setup_naive_distillation(student)
    assert {name.split(".")[0] for name in setup.trainable} == {"image_encoder", "clip_head"}
    assert {name.split(".")[0] for name in setup.frozen} == {"prompt_encoder", "mask_decoder"}
    assert len(setup.parameters) == len(setup.trainable)
    for name, parameter in student.named_parameters():
        assert parameter.requires_grad == (name in setup.trainable), name


def test_naive_loss_only_clip_term(student):
    setup = setup_naive_distillation(student)
    images = torch.randn(2, 3, 128, 128)
    losses = naive_distillation_loss(student, images, torch.randn(2, 256))
    assert list(losses) == ["clip_cosine"]
    losses["clip_cosine"].backward()
    assert all(parameter.grad is not None for parameter in student.clip_head.parameters())
    assert student.image_encoder.blocks[0].attn.qkv.weight.grad is not None
    assert all(parameter.grad is None for parameter in student.mask_decoder.parameters())
    assert len(setup.frozen) > 0


def distilled_copy(student: SamClip) -> SamClip:
    distilled = build_student("tiny", build_sam("tiny"), 256)  # other random weights
    distilled.clip_head.load_state_dict(student.clip_head.state_dict())
    return distilled


def test_wise_ft_endpoints_and_midpoint(student, tiny_sam):
    distilled = distilled_copy(student)
    original = tiny_sam.state_dict()
    for alpha in (0.0, 0.5, 1.0):
        merged = wise_ft(tiny_sam, distilled, alpha).state_dict()
        for key, value in original.items():
            if value.is_floating_point():
                expected = (1 - alpha) * value + alpha * distilled.state_dict()[key]
                torch.testing.assert_close(merged[key], expected, rtol=1e-6, atol=1e-6)
        for key, value in distilled.clip_head.state_dict().items():
            assert torch.equal(merged[f"clip_head.{key}"], value)
    assert torch.equal(
        wise_ft(tiny_sam, distilled, 1.0).image_encoder.pos_embed, distilled.image_encoder.pos_embed
    )


def test_wise_ft_leaves_inputs_unchanged(student, tiny_sam):
    distilled = distilled_copy(student)
    before = {key: value.clone() for key, value in distilled.state_dict().items()}
    wise_ft(student, distilled, 0.3)
    assert all(torch.equal(before[key], value) for key, value in distilled.state_dict().items())


def test_wise_ft_invalid(student, tiny_sam):
    with pytest.raises(ValueError, match="alpha"):
        wise_ft(tiny_sam, student, 1.5)
    with torch.device("meta"):
        vit_b = build_sam("vit_b")
    with pytest.raises(ValueError, match="same SAM variant"):
        wise_ft(vit_b, student, 0.5)
