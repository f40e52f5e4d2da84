"""Parameter counts of a SamClip student by part: backbone, CLIP head and SAM head.

SAM-CLIP (Wang et al., arXiv 2310.15308) states that the CLIP head adds about 25% to a ViT-B.
`count_student_parameters` builds the student on the meta device, so counting vit_b needs no
memory for weights and takes about a second.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from samclip.model.architectures import build_student, get_student_arch
from samclip.model.clip_head import Pooling
from samclip.model.sam_teacher import build_sam
from samclip.model.student import SamClip

PAPER_HEAD_SHARE = 0.25  # "about 25%" of a ViT-B, as SAM-CLIP states it


class ParameterCounts(NamedTuple):
    """Parameter counts of one student.

    backbone: SAM's image encoder, including its neck.
    clip_head: the CLIP head's blocks, LayerNorm and MLP.
    sam_head: SAM's prompt encoder and mask decoder.
    """

    backbone: int
    clip_head: int
    sam_head: int

    @property
    def total(self) -> int:
        return self.backbone + self.clip_head + self.sam_head

    @property
    def head_share(self) -> float:
        """The CLIP head's size relative to the backbone."""
        return self.clip_head / self.backbone


def _count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def count_parameters(model: SamClip) -> ParameterCounts:
    """Count the parameters of each part of a built student."""
    return ParameterCounts(
        backbone=_count(model.image_encoder),
        clip_head=_count(model.clip_head),
        sam_head=_count(model.prompt_encoder) + _count(model.mask_decoder),
    )


def build_student_on_meta(
    arch: str,
    embed_dim: int,
    clip_head_depth: int | None = None,
    pooling: Pooling | None = None,
    mlp_hidden_layers: int | None = None,
) -> SamClip:
    """Build a student whose tensors live on the meta device: shapes without storage."""
    sam_variant = get_student_arch(arch).sam_variant
    with torch.device("meta"):
        sam = build_sam(sam_variant)
        return build_student(arch, sam, embed_dim, clip_head_depth, pooling, mlp_hidden_layers)


def count_student_parameters(
    arch: str,
    embed_dim: int,
    clip_head_depth: int | None = None,
    pooling: Pooling | None = None,
    mlp_hidden_layers: int | None = None,
) -> ParameterCounts:
    """Count the parameters of a registered student architecture without allocating weights."""
    return count_parameters(
        build_student_on_meta(arch, embed_dim, clip_head_depth, pooling, mlp_hidden_layers)
    )


def format_counts(name: str, counts: ParameterCounts) -> str:
    """Format counts as aligned lines in millions, with the head share against the paper's 25%."""
    lines = [
        f"{name}",
        f"  backbone (SAM image encoder)      {counts.backbone / 1e6:8.2f} M",
        f"  CLIP head                         {counts.clip_head / 1e6:8.2f} M",
        f"  SAM head (prompt enc. + decoder)  {counts.sam_head / 1e6:8.2f} M",
        f"  total                             {counts.total / 1e6:8.2f} M",
        f"  CLIP head / backbone              {100 * counts.head_share:8.1f} %"
        f"  (paper: about {100 * PAPER_HEAD_SHARE:.0f}%)",
    ]
    return "\n".join(lines)
