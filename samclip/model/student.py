"""SamClip, the student: SAM's image encoder shared by a CLIP head and SAM's mask heads."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder
from torch import nn

from samclip.model.clip_head import ClipHead
from samclip.model.prompts import Prompts

if TYPE_CHECKING:
    from samclip.model.architectures import StudentArch


class MaskPrediction(NamedTuple):
    """Mask decoder outputs for K prompts per image.

    logits: (B, K, 4h, 4w) low-resolution mask logits, or (B, K, 3, 4h, 4w) with multimask
        output, where (h, w) is the image embedding's grid (256 x 256 for 1024 px SAM).
    iou: (B, K) predicted mask IoU, or (B, K, 3) with multimask output.
    """

    logits: torch.Tensor
    iou: torch.Tensor


class SamClipOutput(NamedTuple):
    """Outputs of SamClip.forward.

    clip_embedding: (B, D) pooled CLIP-head output, not normalised.
    image_embeddings: (B, C', h, w) input of SAM's mask decoder.
    """

    clip_embedding: torch.Tensor
    image_embeddings: torch.Tensor


def _prompt_groups(prompts: Prompts, b: int) -> dict[tuple[bool, bool], torch.Tensor]:
    """Group image b's prompts by (has points, has box), mapping to their prompt indices."""
    has_points = (prompts.point_labels[b] >= 0).any(dim=-1)  # (K,)
    if prompts.boxes is None:
        has_box = torch.zeros_like(has_points)
    else:
        has_box = (prompts.boxes[b] >= 0).all(dim=-1)  # (K,)
    empty = torch.nonzero(~has_points & ~has_box).flatten()
    if empty.numel() > 0:
        raise ValueError(
            f"image {b}: prompts {empty.tolist()[:5]} have neither a point (label >= 0) nor a box"
        )
    groups = {}
    for key in ((True, False), (False, True), (True, True)):
        index = torch.nonzero((has_points == key[0]) & (has_box == key[1])).flatten()
        if index.numel() > 0:
            groups[key] = index
    return groups


def decode_masks(
    prompt_encoder: PromptEncoder,
    mask_decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    prompts: Prompts,
    multimask_output: bool = False,
) -> MaskPrediction:
    """Predict masks for K prompts per image with SAM's prompt encoder and mask decoder.

    Shared by the student and the frozen SAM teacher, so both decode the same prompts the same
    way. SAM's decoder repeats one image embedding for a batch of prompts, so images are decoded
    one at a time, as SamPredictor.predict_torch does. Within an image, prompts are decoded in
    groups of the same kind (points only, box only, points and box), so each is encoded as it
    would be alone.

    Args:
        image_embeddings: (B, C', h, w) from SAM's image encoder.
        prompts: K prompts per image in the SAM input frame.

    Returns:
        MaskPrediction with logits (B, K, 4h, 4w) and iou (B, K), or (B, K, 3, 4h, 4w) and
        (B, K, 3) with multimask output.
    """
    batch_size, num_prompts = prompts.point_labels.shape[:2]
    if image_embeddings.ndim != 4 or image_embeddings.shape[0] != batch_size:
        raise ValueError(
            f"expected image embeddings (B={batch_size}, C', h, w) to match the prompts, "
            f"got {tuple(image_embeddings.shape)}"
        )
    num_masks = mask_decoder.num_multimask_outputs if multimask_output else 1
    height, width = (4 * side for side in image_embeddings.shape[-2:])
    logits = image_embeddings.new_zeros(batch_size, num_prompts, num_masks, height, width)
    iou = image_embeddings.new_zeros(batch_size, num_prompts, num_masks)
    dense_pe = prompt_encoder.get_dense_pe()

    for b in range(batch_size):
        for (use_points, use_box), index in _prompt_groups(prompts, b).items():
            points = None
            if use_points:
                points = (prompts.points[b, index], prompts.point_labels[b, index])
            boxes = prompts.boxes[b, index] if use_box else None  # type: ignore[index]
            sparse, dense = prompt_encoder(points=points, boxes=boxes, masks=None)
            group_logits, group_iou = mask_decoder(
                image_embeddings=image_embeddings[b : b + 1],
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            logits[b, index] = group_logits
            iou[b, index] = group_iou

    if not multimask_output:
        return MaskPrediction(logits=logits[:, :, 0], iou=iou[:, :, 0])
    return MaskPrediction(logits=logits, iou=iou)


class SamClip(nn.Module):
    """SAM-CLIP student: a SAM ViT backbone, a CLIP head, SAM's prompt encoder and mask decoder.

    Build it with architectures.build_student. Images are (B, 3, H, W) normalised with SAM's
    pixel statistics, with H and W multiples of the patch size: the SAM branch runs at the native
    resolution, and the CLIP branch may run at any other.
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        clip_head: ClipHead,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        arch: StudentArch,
        embed_dim: int,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.clip_head = clip_head
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.arch = arch
        self.embed_dim = embed_dim

    @property
    def patch_size(self) -> int:
        return int(self.image_encoder.patch_embed.proj.stride[0])

    def backbone_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Run patch embedding, position embedding and all blocks: (B, 3, H, W) to (B, h, w, C).

        At a token grid other than the native one, the absolute position embedding is resized
        with bicubic interpolation. Windowed blocks pad the grid themselves, and SAM's
        get_rel_pos interpolates the relative position tables.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        patch = self.patch_size
        if images.shape[2] % patch or images.shape[3] % patch:
            raise ValueError(
                f"image size {tuple(images.shape[2:])} is not a multiple of the patch size "
                f"{patch}; resize or pad the input"
            )

        tokens = self.image_encoder.patch_embed(images)  # (B, h, w, C)
        pos_embed = self.image_encoder.pos_embed
        if pos_embed is not None:
            if pos_embed.shape[1:3] != tokens.shape[1:3]:
                pos_embed = F.interpolate(
                    pos_embed.permute(0, 3, 1, 2),  # (1, C, h0, w0)
                    size=tuple(tokens.shape[1:3]),
                    mode="bicubic",
                    align_corners=False,
                ).permute(0, 2, 3, 1)  # (1, h, w, C)
            tokens = tokens + pos_embed

        for block in self.image_encoder.blocks:
            tokens = block(tokens)
        return tokens

    def image_embeddings_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Apply SAM's neck: (B, h, w, C) tokens to (B, C', h, w) image embeddings."""
        return self.image_encoder.neck(tokens.permute(0, 3, 1, 2))

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Compute SAM image embeddings (B, C', h, w).

        At the native input size the result equals ImageEncoderViT.forward exactly.
        """
        return self.image_embeddings_from_tokens(self.backbone_tokens(images))

    def clip_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Compute pooled CLIP-space embeddings (B, D), not normalised."""
        return self.clip_head(self.backbone_tokens(images))

    def clip_patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Compute per-patch CLIP-space embeddings (B, h, w, D), not normalised."""
        return self.clip_head.forward_patches(self.backbone_tokens(images))

    def predict_masks(
        self, image_embeddings: torch.Tensor, prompts: Prompts, multimask_output: bool = False
    ) -> MaskPrediction:
        """Predict masks for K prompts per image from (B, C', h, w) embeddings; see decode_masks."""
        return decode_masks(
            self.prompt_encoder, self.mask_decoder, image_embeddings, prompts, multimask_output
        )

    def forward(self, images: torch.Tensor) -> SamClipOutput:
        """Run the backbone once and both heads' image parts on (B, 3, H, W) images."""
        tokens = self.backbone_tokens(images)
        return SamClipOutput(
            clip_embedding=self.clip_head(tokens),
            image_embeddings=self.image_embeddings_from_tokens(tokens),
        )
