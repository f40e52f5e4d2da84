"""Training steps of each stage as plain torch functions, without Ray.

Stage semantics (SAM-CLIP, Wang et al., arXiv 2310.15308):
- stage 1, head probing: only the CLIP head trains, on L_CLIP (cosine distance to the CLIP
  teacher's image embedding).
- stage 2, multi-task distillation: the image encoder, the CLIP head and the SAM head (prompt
  encoder and mask decoder) train. One optimiser step backpropagates L_CLIP on a CLIP batch and
  lambda * L_SAM on a SAM batch, accumulates both gradients, then steps once. The CLIP head
  trains at ``lr``; the image encoder and the SAM head at ``lr * lr_ratio``.
- stage 3, resolution adaptation: as stage 1, at a higher CLIP input resolution.
- stage 4, naive distillation (the paper's baseline, not part of the pipeline): the image
  encoder and the CLIP head train on L_CLIP only, and the SAM head stays frozen. The CLIP head
  trains at ``lr``, the image encoder at ``lr * lr_ratio``.

L_SAM compares the student's mask logits with those of the frozen teacher decoder run on the
precomputed teacher image embedding, for the same sampled prompts.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from samclip.config import StageConfig

STAGES = (1, 2, 3, 4)
NAIVE_DISTILLATION_STAGE = 4

# Parameter groups that train in each stage, as (group name, SamClip submodules).
STAGE_GROUPS: dict[int, tuple[tuple[str, tuple[str, ...]], ...]] = {
    1: (("clip_head", ("clip_head",)),),
    2: (
        ("clip_head", ("clip_head",)),
        ("backbone", ("image_encoder",)),
        ("sam_head", ("prompt_encoder", "mask_decoder")),
    ),
    3: (("clip_head", ("clip_head",)),),
    4: (("clip_head", ("clip_head",)), ("backbone", ("image_encoder",))),
}


@dataclass
class ClipBatch:
    """Student CLIP inputs and the CLIP teacher's embeddings of the same images."""

    images: torch.Tensor  # (B, 3, S, S) at the stage's clip_resolution
    targets: torch.Tensor  # (B, D) float32

    def to(self, device: torch.device | str) -> "ClipBatch":
        return ClipBatch(self.images.to(device), self.targets.to(device))


@dataclass
class SamBatch:
    """Student SAM inputs and the SAM teacher's image-encoder embeddings of the same images."""

    images: torch.Tensor  # (B, 3, H, W) at the student's SAM resolution
    valid_hw: list[tuple[int, int]]  # unpadded (h, w) of each image inside (H, W)
    teacher_embeddings: torch.Tensor  # (B, C', h', w') float32

    def to(self, device: torch.device | str) -> "SamBatch":
        return SamBatch(self.images.to(device), self.valid_hw, self.teacher_embeddings.to(device))


def check_stage(stage: int) -> None:
    if stage not in STAGES:
        raise ValueError(f"invalid stage {stage}: expected one of {STAGES}")


def trainable_parameters(model: nn.Module, stage: int) -> dict[str, list[nn.Parameter]]:
    """Return the parameters that train in ``stage``, by parameter group name."""
    check_stage(stage)
    groups: dict[str, list[nn.Parameter]] = {}
    for group, modules in STAGE_GROUPS[stage]:
        groups[group] = [p for name in modules for p in getattr(model, name).parameters()]
    return groups


def freeze_for_stage(model: nn.Module, stage: int) -> int:
    """Set ``requires_grad`` so that only the stage's groups train; returns the trainable count."""
    trainable = {id(p) for params in trainable_parameters(model, stage).values() for p in params}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def group_learning_rates(stage: int, stage_cfg: StageConfig) -> dict[str, float]:
    """Return the peak learning rate of each parameter group of ``stage``."""
    check_stage(stage)
    return {
        group: stage_cfg.lr if group == "clip_head" else stage_cfg.lr * stage_cfg.lr_ratio
        for group, _ in STAGE_GROUPS[stage]
    }


def build_optimizer(model: nn.Module, stage: int, stage_cfg: StageConfig) -> torch.optim.AdamW:
    """Build AdamW over the stage's parameter groups (weight decay applies to every parameter)."""
    lrs = group_learning_rates(stage, stage_cfg)
    groups = [
        {"name": group, "params": params, "lr": lrs[group]}
        for group, params in trainable_parameters(model, stage).items()
        if params
    ]
    return torch.optim.AdamW(groups, lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay)


class WarmupCosine:
    """Learning-rate factor: linear warm-up over ``warmup_steps``, then cosine decay to zero.

    It is a class rather than a closure, so the scheduler's state dict contains plain values.
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = max(total_steps, 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, stage_cfg: StageConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(stage_cfg.warmup_steps, total_steps))


def forward_precision(device: torch.device, autocast_dtype: torch.dtype | None):
    """Return the autocast context of a forward pass: none for float32, else ``autocast_dtype``."""
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype)


def clip_loss_terms(
    model: nn.Module, batch: ClipBatch, autocast_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Compute L_CLIP terms: ``clip_cosine`` is the mean cosine distance to the teacher.

    With ``autocast_dtype`` the student runs under autocast and the loss in float32.
    """
    from samclip.model.losses import clip_distillation_loss

    with forward_precision(batch.images.device, autocast_dtype):
        embedding = model.clip_embedding(batch.images)
    return clip_distillation_loss(embedding.float(), batch.targets)


def teacher_mask_logits(
    teacher: nn.Module, batch: SamBatch, prompts: Any, autocast_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Run the frozen teacher decoder on the precomputed embeddings: (B, K, 4h', 4w') logits."""
    from samclip.model.student import decode_masks

    with torch.no_grad(), forward_precision(batch.images.device, autocast_dtype):
        prediction = decode_masks(
            teacher.prompt_encoder, teacher.mask_decoder, batch.teacher_embeddings, prompts
        )
    return prediction.logits.float()


def student_mask_logits(
    model: nn.Module, batch: SamBatch, prompts: Any, autocast_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Run the student's image encoder and SAM head: (B, K, 4h', 4w') logits."""
    with forward_precision(batch.images.device, autocast_dtype):
        logits = model.predict_masks(model.image_embeddings(batch.images), prompts).logits
    return logits.float()


def sam_loss_terms(
    model: nn.Module,
    teacher: nn.Module,
    batch: SamBatch,
    prompts: Any,
    stage_cfg: StageConfig,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Compute L_SAM terms (``sam_focal``, ``sam_dice``, ``sam``) against the teacher's masks."""
    from samclip.model.losses import sam_distillation_loss

    targets = teacher_mask_logits(teacher, batch, prompts, autocast_dtype)
    logits = student_mask_logits(model, batch, prompts, autocast_dtype)
    return sam_distillation_loss(logits, targets, stage_cfg.focal_weight, stage_cfg.dice_weight)


def accumulate_gradients(
    model: nn.Module,
    stage: int,
    stage_cfg: StageConfig,
    clip_batch: ClipBatch,
    sam_batch: SamBatch | None = None,
    prompts: Any = None,
    teacher: nn.Module | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Backpropagate one step's losses into ``.grad`` and return every loss term as a float.

    Stage 2 runs two backward passes, first L_CLIP on the CLIP batch, then lambda * L_SAM on the
    SAM batch, so that only one branch's activations are alive at a time. The gradients add up
    in ``.grad`` exactly as one backward of the sum would. ``autocast_dtype`` (bfloat16 on GPUs)
    runs the forward passes under autocast; the backward passes run outside it.
    """
    check_stage(stage)
    terms = clip_loss_terms(model, clip_batch, autocast_dtype)
    terms["clip_cosine"].backward()
    logged = {name: float(value.detach()) for name, value in terms.items()}
    loss = logged["clip_cosine"]

    if stage == 2:
        if sam_batch is None or teacher is None or prompts is None:
            raise ValueError("stage 2 needs a SAM batch, its prompts and the teacher decoder")
        sam_terms = sam_loss_terms(model, teacher, sam_batch, prompts, stage_cfg, autocast_dtype)
        (stage_cfg.sam_loss_weight * sam_terms["sam"]).backward()
        logged.update({name: float(value.detach()) for name, value in sam_terms.items()})
        loss += stage_cfg.sam_loss_weight * logged["sam"]

    logged["loss"] = loss
    return logged


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    stage_cfg: StageConfig,
) -> float:
    """Clip the gradient norm, step, advance the schedule, zero the gradients; returns the norm."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    max_norm = stage_cfg.grad_clip if stage_cfg.grad_clip is not None else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def mask_iou(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """IoU of the binarised masks (logit > 0) per mask: (B, K); two empty masks count as 1."""
    student = (student_logits > 0).flatten(2)
    teacher = (teacher_logits > 0).flatten(2)
    intersection = (student & teacher).sum(-1).float()
    union = (student | teacher).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


@torch.no_grad()
def validation_sums(
    model: nn.Module,
    stage_cfg: StageConfig,
    clip_batch: ClipBatch | None = None,
    sam_batch: SamBatch | None = None,
    prompts: Any = None,
    teacher: nn.Module | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Return per-batch sums for validation: losses times images, IoU times masks, and counts."""
    from samclip.model.losses import sam_distillation_loss

    sums: dict[str, float] = {}
    if clip_batch is not None:
        count = clip_batch.images.shape[0]
        terms = clip_loss_terms(model, clip_batch, autocast_dtype)
        sums["clip_cosine"] = float(terms["clip_cosine"]) * count
        sums["clip_count"] = count
    if sam_batch is not None:
        if teacher is None or prompts is None:
            raise ValueError("SAM validation needs the prompts and the teacher decoder")
        targets = teacher_mask_logits(teacher, sam_batch, prompts, autocast_dtype)
        logits = student_mask_logits(model, sam_batch, prompts, autocast_dtype)
        terms = sam_distillation_loss(logits, targets, stage_cfg.focal_weight, stage_cfg.dice_weight)
        images = sam_batch.images.shape[0]
        iou = mask_iou(logits, targets)
        sums.update({name: float(value) * images for name, value in terms.items()})
        sums["sam_count"] = images
        sums["sam_iou"] = float(iou.sum())
        sums["mask_count"] = iou.numel()
    return sums


def validation_metrics(sums: dict[str, float], stage: int, stage_cfg: StageConfig) -> dict[str, float]:
    """Turn summed validation statistics into ``val/...`` metrics.

    ``val/loss`` is the stage's objective (L_CLIP, plus lambda * L_SAM in stage 2), the value that
    early stopping watches. ``val/clip_similarity`` (1 - L_CLIP) and ``val/sam_iou`` (mask IoU
    with the teacher) are the two numbers that compare runs with different lambdas.
    """
    metrics: dict[str, float] = {}
    if sums.get("clip_count"):
        metrics["val/clip_cosine"] = sums["clip_cosine"] / sums["clip_count"]
        metrics["val/clip_similarity"] = 1.0 - metrics["val/clip_cosine"]
        metrics["val/loss"] = metrics["val/clip_cosine"]
    if sums.get("sam_count"):
        for name in ("sam_focal", "sam_dice", "sam"):
            metrics[f"val/{name}"] = sums[name] / sums["sam_count"]
        metrics["val/sam_iou"] = sums["sam_iou"] / sums["mask_count"]
        if stage == 2 and "val/loss" in metrics:
            metrics["val/loss"] += stage_cfg.sam_loss_weight * metrics["val/sam"]
    return metrics
