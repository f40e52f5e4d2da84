"""Student architectures and the builders that initialise a SamClip from a SAM teacher."""

from __future__ import annotations

import copy
import dataclasses

from segment_anything.modeling import Sam

from samclip.model.clip_head import ClipHead, Pooling
from samclip.model.sam_teacher import build_sam, get_sam_arch
from samclip.model.student import SamClip


@dataclasses.dataclass(frozen=True)
class StudentArch:
    """Architecture of a SAM-CLIP student."""

    sam_variant: str  # key of sam_teacher.SAM_VARIANTS; the backbone and SAM heads
    clip_head_depth: int = 3  # transformer blocks in the CLIP head
    pooling: Pooling = "max"
    mlp_hidden_layers: int = 2  # hidden layers of the CLIP head's MLP
    clip_resolution: int = 224  # default input size of the CLIP branch, pixels
    sam_resolution: int = 1024  # input size of the SAM branch, pixels; SAM's native size


STUDENT_ARCHS: dict[str, StudentArch] = {
    "tiny": StudentArch(sam_variant="tiny", clip_resolution=128, sam_resolution=256),
    "vit_b": StudentArch(sam_variant="vit_b", clip_resolution=224, sam_resolution=1024),
}


def get_student_arch(
    arch: str,
    clip_head_depth: int | None = None,
    pooling: Pooling | None = None,
    mlp_hidden_layers: int | None = None,
) -> StudentArch:
    """Return a registered student architecture with the given fields overridden."""
    if arch not in STUDENT_ARCHS:
        raise ValueError(f"unknown student arch {arch!r}; expected one of {sorted(STUDENT_ARCHS)}")
    overrides = {
        "clip_head_depth": clip_head_depth,
        "pooling": pooling,
        "mlp_hidden_layers": mlp_hidden_layers,
    }
    return dataclasses.replace(
        STUDENT_ARCHS[arch], **{key: value for key, value in overrides.items() if value is not None}
    )


def build_student(
    arch: str,
    sam: Sam,
    embed_dim: int,
    clip_head_depth: int | None = None,
    pooling: Pooling | None = None,
    mlp_hidden_layers: int | None = None,
) -> SamClip:
    """Build a student whose backbone and SAM heads are copies of `sam`'s.

    The CLIP head's blocks are copies of the backbone's last block and its MLP is random,
    drawn from the global torch RNG, so a fixed torch seed gives the same head. The teacher is
    left untouched, so the student reproduces its masks exactly at initialisation. The student
    starts in the teacher's train or eval mode.

    Args:
        arch: key of STUDENT_ARCHS.
        sam: the SAM teacher; its encoder width and depth must match the arch's SAM variant.
        embed_dim: D, the CLIP teacher's embedding dimension.
    """
    student_arch = get_student_arch(arch, clip_head_depth, pooling, mlp_hidden_layers)
    sam_arch = get_sam_arch(student_arch.sam_variant)
    encoder = sam.image_encoder
    found = (encoder.patch_embed.proj.out_channels, len(encoder.blocks), encoder.img_size)
    expected = (sam_arch.encoder_embed_dim, sam_arch.encoder_depth, sam_arch.image_size)
    if found != expected:
        raise ValueError(
            f"student arch {arch!r} needs SAM {student_arch.sam_variant} (embed dim, depth, image "
            f"size {expected}), got a SAM with {found}; load the matching SAM checkpoint"
        )

    image_encoder = copy.deepcopy(encoder)
    clip_head = ClipHead(
        image_encoder.blocks[-1],
        embed_dim=embed_dim,
        depth=student_arch.clip_head_depth,
        pooling=student_arch.pooling,
        mlp_hidden_layers=student_arch.mlp_hidden_layers,
    )
    student = SamClip(
        image_encoder=image_encoder,
        clip_head=clip_head,
        prompt_encoder=copy.deepcopy(sam.prompt_encoder),
        mask_decoder=copy.deepcopy(sam.mask_decoder),
        arch=student_arch,
        embed_dim=embed_dim,
    )
    return student.train(sam.training)


def build_student_random(
    arch: str,
    embed_dim: int,
    clip_head_depth: int | None = None,
    pooling: Pooling | None = None,
    mlp_hidden_layers: int | None = None,
) -> SamClip:
    """Build a randomly initialised student, to load a student checkpoint into."""
    sam_variant = get_student_arch(arch).sam_variant
    return build_student(
        arch, build_sam(sam_variant), embed_dim, clip_head_depth, pooling, mlp_hidden_layers
    )
