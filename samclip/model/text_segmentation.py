"""Text-prompted segmentation through both heads of a SamClip student.

The composition of SAM-CLIP (Wang et al., arXiv 2310.15308, text-prompted segmentation):

1. The image is encoded once at the SAM input resolution (1024 px for vit_b).
2. The CLIP head's patch embeddings are scored against the text classifier, giving
   low-resolution class logits on the token grid (B, C, h, w), 64 x 64 for vit_b at 1024 px.
3. Per class, up to `num_points` foreground points are drawn without replacement, with a
   probability proportional to the class's confidence (its softmax probability over the requested
   classes) on the patches where that class wins. A class that wins no patch is sampled from its
   confidence over the whole image.
4. The class's log-odds map, resized to the prompt encoder's mask-input size (4h, 4w), and the
   points go into SAM's prompt encoder. SAM's mask decoder returns one low-resolution mask per
   class (B, C, 4h, 4w).
5. Each pixel gets the class with the highest mask logit (argmax over the requested classes).

Background: the paper does not say how it handles pixels that belong to no requested class.
With `background_threshold=None` (the default) every pixel gets a class, as a plain argmax does.
With a threshold t, a pixel whose winning mask probability sigmoid(logit) is below t is labelled
BACKGROUND (-1) instead.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from samclip.model.images import sam_input
from samclip.model.student import SamClip
from samclip.model.zero_shot import classify

BACKGROUND = -1  # label of background pixels and of the padding outside the image
# Bound of the log-odds fed to the prompt encoder as mask input. A probability of exactly 0 or 1
# (which a single requested class always has) would give an infinite log-odds.
MASK_INPUT_LOGIT_BOUND = 20.0


class TextSegmentation(NamedTuple):
    """Outputs of segment_by_text for B images and C requested classes.

    labels: (B, S, S) int64 class index per pixel of the SAM input frame; BACKGROUND (-1) for
        pixels below the background threshold and for the padding outside each image.
    mask_logits: (B, C, 4h, 4w) SAM mask logits, one mask per class.
    iou: (B, C) the mask decoder's predicted IoU of each mask.
    class_logits: (B, C, h, w) CLIP-head patch logits (cosine x 100) on the token grid.
    points: (B, C, P, 2) (x, y) point prompts in the SAM input frame.
    point_labels: (B, C, P) int64; 1 for a sampled point, -1 for an unused slot.
    """

    labels: torch.Tensor
    mask_logits: torch.Tensor
    iou: torch.Tensor
    class_logits: torch.Tensor
    points: torch.Tensor
    point_labels: torch.Tensor


class ImageTextSegmentation(NamedTuple):
    """Outputs of segment_image_by_text for one (H, W, 3) image.

    labels: (H, W) int64 class index per pixel of the original image, BACKGROUND (-1) where no
        class reaches the background threshold.
    points: (C, P, 2) (x, y) point prompts in original image pixels.
    point_labels: (C, P) int64; 1 for a sampled point, -1 for an unused slot.
    details: the batched outputs in the SAM input frame, with B = 1.
    """

    labels: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray
    details: TextSegmentation


def sample_confident_points(
    confidence: torch.Tensor, valid: torch.Tensor, num_points: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw up to `num_points` grid cells per class, with probability proportional to confidence.

    Args:
        confidence: (C, h, w) probability of each class per cell, summing to 1 over C.
        valid: (h, w) bool, the cells inside the image (not padding).
        num_points: P, the point slots per class.

    Returns:
        cells: (C, P, 2) int64 (row, col) of each drawn cell.
        labels: (C, P) int64; 1 for a drawn cell, -1 for an unused slot (fewer cells with a
            non-zero weight than P).
    """
    num_classes, height, width = confidence.shape
    winner = confidence.argmax(dim=0)  # (h, w)
    cells = torch.zeros(num_classes, num_points, 2, dtype=torch.long)
    labels = torch.full((num_classes, num_points), -1, dtype=torch.long)
    for c in range(num_classes):
        weights = confidence[c] * valid
        confident = weights * (winner == c)
        if confident.sum() > 0:
            weights = confident
        weights = weights.flatten().double()
        count = min(num_points, int((weights > 0).sum()))
        if count == 0:
            # a class with zero probability on every valid cell: draw one valid cell uniformly
            weights = valid.flatten().double()
            count = 1
        index = torch.multinomial(weights, count, replacement=False, generator=generator)
        cells[c, :count, 0] = index // width
        cells[c, :count, 1] = index % width
        labels[c, :count] = 1
    return cells, labels


def _mask_input(class_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Turn (C, h, w) class logits into (C, 1, 4h, 4w) clamped log-odds for the prompt encoder."""
    log_probs = class_logits.log_softmax(dim=0)  # (C, h, w)
    # log(p / (1 - p)) computed from log p, exact where p is near 0 or 1
    log_odds = log_probs - torch.log1p(-log_probs.exp().clamp(max=1.0 - 1e-7))
    log_odds = log_odds.clamp(-MASK_INPUT_LOGIT_BOUND, MASK_INPUT_LOGIT_BOUND)
    return F.interpolate(log_odds[:, None], size=size, mode="bilinear", align_corners=False)


def labels_from_mask_logits(
    mask_logits: torch.Tensor, out_hw: tuple[int, int], background_threshold: float | None
) -> torch.Tensor:
    """Upscale (..., C, 4h, 4w) mask logits bilinearly to out_hw and take the per-pixel argmax.

    Returns:
        (..., H, W) int64 class indices, BACKGROUND where the winning probability is below
        `background_threshold`.
    """
    lead = mask_logits.shape[:-3]
    flat = mask_logits.reshape(-1, *mask_logits.shape[-3:])  # (N, C, 4h, 4w)
    upscaled = F.interpolate(flat, size=tuple(out_hw), mode="bilinear", align_corners=False)
    best, labels = upscaled.max(dim=1)  # (N, H, W)
    if background_threshold is not None:
        labels[torch.sigmoid(best) < background_threshold] = BACKGROUND
    return labels.reshape(*lead, *out_hw)


def _check_arguments(
    model: SamClip, images: torch.Tensor, valid_hw: list[tuple[int, int]], num_points: int,
    background_threshold: float | None,
) -> None:  # fmt: skip
    size = model.arch.sam_resolution
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise ValueError(
            f"expected SAM inputs (B, 3, {size}, {size}) at the student's SAM resolution, got "
            f"{tuple(images.shape)}; build them with images.sam_input(image, {size})"
        )
    if len(valid_hw) != images.shape[0]:
        raise ValueError(f"valid_hw has {len(valid_hw)} entries for {images.shape[0]} images")
    if num_points < 1:
        raise ValueError(f"num_points must be at least 1, got {num_points}")
    if background_threshold is not None and not 0.0 <= background_threshold <= 1.0:
        raise ValueError(f"background_threshold must be within [0, 1], got {background_threshold}")


@torch.no_grad()
def segment_by_text(
    model: SamClip,
    images: torch.Tensor,
    valid_hw: list[tuple[int, int]],
    classifier: torch.Tensor,
    generator: torch.Generator,
    num_points: int = 3,
    background_threshold: float | None = None,
) -> TextSegmentation:
    """Segment B images into C text-defined classes with the CLIP head and the SAM head.

    Args:
        images: (B, 3, S, S) SAM inputs at the student's SAM resolution, from images.sam_input.
        valid_hw: the (h, w) of each resized image inside its padded input.
        classifier: (C, D) unit-norm text embeddings, from zero_shot.build_text_classifier.
        generator: the RNG of the point sampling, so a seeded generator repeats the result.
        num_points: P, the point prompts per class (the paper samples 1 to 3).
        background_threshold: None for a plain argmax, or the mask probability below which a
            pixel is BACKGROUND.
    """
    _check_arguments(model, images, valid_hw, num_points, background_threshold)
    size = model.arch.sam_resolution
    patch = model.patch_size

    # one backbone pass feeds both heads
    tokens = model.backbone_tokens(images)  # (B, h, w, C_vit)
    patch_embeddings = model.clip_head.forward_patches(tokens)  # (B, h, w, D)
    image_embeddings = model.image_embeddings_from_tokens(tokens)  # (B, C', h, w)
    class_logits = classify(patch_embeddings, classifier).permute(0, 3, 1, 2)  # (B, C, h, w)

    batch_size, num_classes, grid_h, grid_w = class_logits.shape
    mask_hw = (4 * grid_h, 4 * grid_w)
    mask_logits = image_embeddings.new_zeros(batch_size, num_classes, *mask_hw)
    iou = image_embeddings.new_zeros(batch_size, num_classes)
    points = torch.zeros(batch_size, num_classes, num_points, 2)
    point_labels = torch.zeros(batch_size, num_classes, num_points, dtype=torch.long)
    dense_pe = model.prompt_encoder.get_dense_pe()

    for b, (height, width) in enumerate(valid_hw):
        # points: importance sampling on the token grid, placed at the patch centres
        valid = torch.zeros(grid_h, grid_w, dtype=torch.bool)
        valid[: -(-height // patch), : -(-width // patch)] = True
        confidence = class_logits[b].float().softmax(dim=0)  # (C, h, w)
        cells, labels = sample_confident_points(confidence, valid, num_points, generator)
        centres = cells.flip(-1).float() * patch + (patch - 1) / 2.0  # (C, P, 2) as (x, y)
        points[b] = centres
        point_labels[b] = labels

        # SAM head: points and the class's low-resolution mask, one prompt per class
        sparse, dense = model.prompt_encoder(
            points=(centres.to(image_embeddings), labels.to(image_embeddings.device)),
            boxes=None,
            masks=_mask_input(class_logits[b].float(), mask_hw).to(image_embeddings),
        )
        logits, scores = model.mask_decoder(
            image_embeddings=image_embeddings[b : b + 1],
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        mask_logits[b] = logits[:, 0]
        iou[b] = scores[:, 0]

    # per-pixel argmax in the SAM input frame; padding is background
    pixel_labels = labels_from_mask_logits(mask_logits, (size, size), background_threshold)
    for b, (height, width) in enumerate(valid_hw):
        pixel_labels[b, height:, :] = BACKGROUND
        pixel_labels[b, :, width:] = BACKGROUND
    return TextSegmentation(
        labels=pixel_labels,
        mask_logits=mask_logits,
        iou=iou,
        class_logits=class_logits,
        points=points,
        point_labels=point_labels,
    )


def segment_image_by_text(
    model: SamClip,
    image: np.ndarray,
    classifier: torch.Tensor,
    generator: torch.Generator,
    num_points: int = 3,
    background_threshold: float | None = None,
) -> ImageTextSegmentation:
    """Segment one (H, W, 3) uint8 image into C text-defined classes; see segment_by_text.

    The mask logits are upscaled to the SAM input frame, cropped to the image and resized to
    (H, W) before the argmax, as SAM's postprocess_masks does.
    """
    size = model.arch.sam_resolution
    pixels, valid_hw = sam_input(image, size)
    device = next(model.parameters()).device
    details = segment_by_text(
        model, pixels[None].to(device), [valid_hw], classifier.to(device), generator, num_points,
        background_threshold,
    )  # fmt: skip

    upscaled = F.interpolate(
        details.mask_logits, size=(size, size), mode="bilinear", align_corners=False
    )
    cropped = upscaled[..., : valid_hw[0], : valid_hw[1]]  # (1, C, h, w) of the resized image
    labels = labels_from_mask_logits(cropped, image.shape[:2], background_threshold)[0]

    scale = np.array([image.shape[1] / valid_hw[1], image.shape[0] / valid_hw[0]])
    points = (details.points[0].cpu().numpy() + 0.5) * scale - 0.5  # pixel centres to image pixels
    return ImageTextSegmentation(
        labels=labels.cpu().numpy(),
        points=points,
        point_labels=details.point_labels[0].cpu().numpy(),
        details=details,
    )
