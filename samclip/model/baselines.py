"""The two baselines SAM-CLIP (Wang et al., arXiv 2310.15308) compares its merging against.

- Naive distillation: CLIP alone distilled into SAM. The backbone and the CLIP head train with
  the cosine loss L_CLIP only, and SAM's prompt encoder and mask decoder stay frozen. The paper
  reports that this gains CLIP's semantics but loses SAM's segmentation.
- Wise-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", 2022): a training-free
  interpolation between the original SAM weights and the distilled ones at a chosen alpha. The
  paper reports that no alpha kept both abilities.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from segment_anything.modeling import Sam
from torch import nn

from samclip.model.losses import clip_distillation_loss
from samclip.model.student import SamClip

# Submodules of SamClip that naive distillation trains and freezes.
NAIVE_TRAINABLE = ("image_encoder", "clip_head")
NAIVE_FROZEN = ("prompt_encoder", "mask_decoder")


class NaiveDistillationSetup(NamedTuple):
    """Parameters of a student prepared for naive distillation.

    parameters: the trainable parameters, to pass to the optimiser.
    trainable: names of the trainable parameters (image_encoder.*, clip_head.*).
    frozen: names of the frozen parameters (prompt_encoder.*, mask_decoder.*).
    """

    parameters: list[nn.Parameter]
    trainable: list[str]
    frozen: list[str]


def setup_naive_distillation(model: SamClip) -> NaiveDistillationSetup:
    """Make the backbone and the CLIP head trainable and freeze SAM's prompt encoder and decoder.

    Changes requires_grad of every parameter of `model` in place.
    """
    trainable: list[str] = []
    frozen: list[str] = []
    parameters: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        part = name.split(".", 1)[0]
        if part not in NAIVE_TRAINABLE + NAIVE_FROZEN:
            raise ValueError(
                f"parameter {name} belongs to no known part of SamClip; expected one of "
                f"{NAIVE_TRAINABLE + NAIVE_FROZEN}"
            )
        train = part in NAIVE_TRAINABLE
        parameter.requires_grad_(train)
        if train:
            trainable.append(name)
            parameters.append(parameter)
        else:
            frozen.append(name)
    return NaiveDistillationSetup(parameters=parameters, trainable=trainable, frozen=frozen)


def naive_distillation_loss(
    model: SamClip, images: torch.Tensor, teacher_embeddings: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Compute the naive baseline's only loss term, L_CLIP, on (B, 3, S, S) images.

    Args:
        teacher_embeddings: (B, D) image embeddings of the CLIP teacher for the same images.

    Returns:
        {"clip_cosine": mean 1 - cos(student, teacher)}, as losses.clip_distillation_loss.
    """
    return clip_distillation_loss(model.clip_embedding(images), teacher_embeddings)


def wise_ft(original: Sam | SamClip, distilled: SamClip, alpha: float) -> SamClip:
    """Interpolate weights: (1 - alpha) * original + alpha * distilled, in a new student.

    Every parameter and floating-point buffer that both models have under the same name
    (image_encoder.*, prompt_encoder.*, mask_decoder.*) is interpolated. The CLIP head exists
    only in the distilled student and is copied unchanged. alpha = 0 gives SAM's backbone with
    the distilled CLIP head, and alpha = 1 gives the distilled student.

    Args:
        original: the SAM the student was initialised from, or a student built from it.
        distilled: the student after distillation.
        alpha: weight of the distilled model, within [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    original_state = original.state_dict()
    merged = copy.deepcopy(distilled)
    state = merged.state_dict()

    shared = [key for key in state if not key.startswith("clip_head.")]
    missing = [key for key in shared if key not in original_state]
    if missing:
        raise ValueError(
            f"the original model lacks {len(missing)} of the student's SAM keys (first: "
            f"{missing[:5]}); pass the SAM the student was built from"
        )
    mismatched = [key for key in shared if original_state[key].shape != state[key].shape]
    if mismatched:
        raise ValueError(
            f"{len(mismatched)} SAM tensors differ in shape between the models (first: "
            f"{mismatched[:5]}); the original must be the same SAM variant as the student"
        )

    with torch.no_grad():
        for key in shared:
            target = state[key]
            if target.is_floating_point():
                source = original_state[key].to(device=target.device, dtype=target.dtype)
                target.copy_(torch.lerp(source, target, alpha))
    return merged
