from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss as torchvision_focal_loss

from samclip.model.losses import clip_distillation_loss, sam_distillation_loss, sigmoid_focal_loss


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_clip_cosine_known_angles():
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    teacher = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # same direction: 0, orthogonal: 1, opposite: 2
    loss = clip_distillation_loss(student, teacher)
    assert set(loss) == {"clip_cosine"}
    assert loss["clip_cosine"].item() == pytest.approx((0.0 + 1.0 + 2.0) / 3)


def test_clip_cosine_scale_invariant():
    student = torch.randn(4, 8)
    teacher = torch.randn(4, 8)
    left = clip_distillation_loss(student, teacher)["clip_cosine"]
    right = clip_distillation_loss(5.0 * student, 0.1 * teacher)["clip_cosine"]
    assert torch.allclose(left, right, atol=1e-6)


def test_clip_cosine_shape_mismatch():
    with pytest.raises(ValueError, match="differs from teacher shape"):
        clip_distillation_loss(torch.zeros(2, 8), torch.zeros(2, 4))


def test_sam_loss_zero_logits_by_hand():
    # p = t = 0.5 everywhere on a 2x2 mask
    # focal per pixel: BCE = ln 2, (1 - p_t)^2 = 0.25, alpha_t = 0.5 -> ln 2 / 8
    # dice: 1 - (2 * 1 + 1) / (2 + 2 + 1) = 0.4
    zeros = torch.zeros(1, 1, 2, 2)
    loss = sam_distillation_loss(zeros, zeros)
    assert set(loss) == {"sam_focal", "sam_dice", "sam"}
    assert loss["sam_focal"].item() == pytest.approx(math.log(2) / 8, rel=1e-6)
    assert loss["sam_dice"].item() == pytest.approx(0.4, rel=1e-6)
    assert loss["sam"].item() == pytest.approx(20 * math.log(2) / 8 + 0.4, rel=1e-6)


def test_sam_loss_mixed_logits_by_hand():
    student = [2.0, -1.0, 0.0, 3.0]
    teacher = [20.0, -20.0, 1.0, -2.0]
    focal_terms = []
    for s, t_logit in zip(student, teacher):
        p, t = sigmoid(s), sigmoid(t_logit)
        bce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        p_t = p * t + (1 - p) * (1 - t)
        alpha_t = 0.25 * t + 0.75 * (1 - t)
        focal_terms.append(alpha_t * bce * (1 - p_t) ** 2)
    probs = [sigmoid(s) for s in student]
    targets = [sigmoid(t) for t in teacher]
    overlap = sum(p * t for p, t in zip(probs, targets))
    dice = 1 - (2 * overlap + 1) / (sum(probs) + sum(targets) + 1)

    student_logits = torch.tensor(student).view(1, 2, 2)
    loss = sam_distillation_loss(student_logits, torch.tensor(teacher).view(1, 2, 2))
    assert loss["sam_focal"].item() == pytest.approx(sum(focal_terms) / 4, rel=1e-5)
    assert loss["sam_dice"].item() == pytest.approx(dice, rel=1e-5)


def test_dice_averaged_per_mask():
    # mask 0: student agrees with a confident teacher; mask 1: student is the opposite
    teacher = torch.full((2, 2, 2), 30.0)
    student = torch.stack([torch.full((2, 2), 30.0), torch.full((2, 2), -30.0)])
    loss = sam_distillation_loss(student, teacher)
    # mask 0: 1 - (8 + 1) / (8 + 1) = 0; mask 1: 1 - 1 / (4 + 1) = 0.8
    assert loss["sam_dice"].item() == pytest.approx(0.4, abs=1e-5)


def test_focal_matches_torchvision():
    logits = torch.randn(3, 5, 5)
    targets = torch.rand(3, 5, 5)
    ours = sigmoid_focal_loss(logits, targets)
    reference = torchvision_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none")
    assert torch.allclose(ours, reference, atol=1e-6)


def test_weights_combine_terms():
    student = torch.randn(2, 3, 4, 4)
    teacher = torch.randn(2, 3, 4, 4)
    loss = sam_distillation_loss(student, teacher, focal_weight=3.0, dice_weight=0.5)
    expected = 3.0 * loss["sam_focal"] + 0.5 * loss["sam_dice"]
    assert torch.allclose(loss["sam"], expected)


def test_no_gradient_into_teacher():
    student = torch.randn(1, 2, 4, 4, requires_grad=True)
    teacher = torch.randn(1, 2, 4, 4, requires_grad=True)
    sam_distillation_loss(student, teacher)["sam"].backward()
    assert student.grad is not None
    assert teacher.grad is None


def test_sam_loss_shape_mismatch():
    with pytest.raises(ValueError, match="same images and prompts"):
        sam_distillation_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))


def test_recorded_values():
    # values recorded from this implementation (torch 2.14.1, CPU); a change means the loss changed
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 8, 8, generator=generator) * 3
    teacher = torch.randn(2, 3, 8, 8, generator=generator) * 3
    loss = sam_distillation_loss(student, teacher)
    assert loss["sam_focal"].item() == pytest.approx(0.383350133895874, rel=1e-5)
    assert loss["sam_dice"].item() == pytest.approx(0.47454285621643066, rel=1e-5)
    assert loss["sam"].item() == pytest.approx(8.141545295715332, rel=1e-5)

    student_embedding = torch.randn(4, 16, generator=generator)
    teacher_embedding = torch.randn(4, 16, generator=generator)
    cosine = clip_distillation_loss(student_embedding, teacher_embedding)["clip_cosine"]
    assert cosine.item() == pytest.approx(1.1934865713119507, rel=1e-5)
