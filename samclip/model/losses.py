"""Distillation losses of SAM-CLIP, each returning a dict of named terms.

The mask loss follows SAM's training loss (focal + dice, 20:1), with the teacher's mask
probabilities sigmoid(teacher_logits) as soft targets instead of binary ground truth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, function_name: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{function_name}: student shape {tuple(student.shape)} differs from teacher shape "
            f"{tuple(teacher.shape)}; both must come from the same images and prompts"
        )


def clip_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cosine distance between student and teacher embeddings, both (B, D), averaged over B.

    Returns:
        {"clip_cosine": mean over the batch of 1 - cos(student, teacher)}.
    """
    _check_same_shape(student, teacher, "clip_distillation_loss")
    if student.ndim != 2:
        raise ValueError(f"expected embeddings (B, D), got {tuple(student.shape)}")
    cosine = F.cosine_similarity(student, teacher.to(student.dtype), dim=-1)  # (B,)
    return {"clip_cosine": (1.0 - cosine).mean()}


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25
) -> torch.Tensor:
    """Sigmoid focal loss of RetinaNet (Lin et al. 2017) per element, with targets in [0, 1].

    With soft targets t: p_t = p * t + (1 - p) * (1 - t), alpha_t = alpha * t + (1 - alpha) *
    (1 - t), and loss = alpha_t * BCE(logits, t) * (1 - p_t) ** gamma. A negative alpha turns
    the alpha weighting off.
    """
    probs = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probs * targets + (1.0 - probs) * (1.0 - targets)
    loss = bce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
    return loss


def dice_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Compute the dice loss per mask over the last two axes.

    loss = 1 - (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1)
    """
    intersection = (probs * targets).sum(dim=(-2, -1))
    total = probs.sum(dim=(-2, -1)) + targets.sum(dim=(-2, -1))
    return 1.0 - (2.0 * intersection + 1.0) / (total + 1.0)


def sam_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    gamma: float = 2.0,
    alpha: float = 0.25,
) -> dict[str, torch.Tensor]:
    """Focal and dice loss between student and teacher mask logits of the same prompts.

    Args:
        student_logits: (..., H, W) mask logits, for example (B, K, H, W).
        teacher_logits: the teacher's logits of the same shape; sigmoid(teacher_logits) are the
            soft targets, and no gradient flows into them.

    Returns:
        {"sam_focal": focal loss averaged over every pixel of every mask,
         "sam_dice": dice loss averaged over masks,
         "sam": focal_weight * sam_focal + dice_weight * sam_dice}.
    """
    _check_same_shape(student_logits, teacher_logits, "sam_distillation_loss")
    if student_logits.ndim < 2:
        raise ValueError(f"expected mask logits (..., H, W), got {tuple(student_logits.shape)}")
    targets = torch.sigmoid(teacher_logits.detach().to(student_logits.dtype))

    focal = sigmoid_focal_loss(student_logits, targets, gamma=gamma, alpha=alpha).mean()
    dice = dice_loss(torch.sigmoid(student_logits), targets).mean()
    return {"sam_focal": focal, "sam_dice": dice, "sam": focal_weight * focal + dice_weight * dice}
