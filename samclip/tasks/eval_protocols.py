"""Evaluation protocols as functions of a model and decoded images, without storage or Ray.

- Zero-shot classification: the CLIP head's pooled embedding of the centre square (CLIP's
  resize-then-centre-crop view) scored against a text classifier; top-1 and top-5.
- Zero-shot semantic segmentation, CLIP head only, as SAM-CLIP (Wang et al., arXiv 2310.15308)
  evaluates it: the whole image resized to 448 x 448, patch embeddings scored against the text
  classifier, logits upscaled bilinearly to the image size, per-pixel argmax; mIoU. The paper
  does not describe background handling; here an optional threshold on the winning softmax
  probability labels low-confidence pixels as background.
- Text-prompted segmentation through both heads (``model.text_segmentation``), turned into the
  same label maps and scored with the same confusion matrix, so the two are comparable.
- SAM retention with box prompts: the SAM head's mask for each ground-truth box against the
  ground-truth mask, and against the SAM teacher's mask for the same box.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from samclip.model.images import SAM_PIXEL_MEAN, SAM_PIXEL_STD, sam_input, student_clip_input
from samclip.model.metrics import mask_ious
from samclip.model.prompts import PADDING_LABEL, Prompts
from samclip.model.zero_shot import classify, segment_logits

PAPER_SEGMENTATION_RESOLUTION = 448  # the paper's input side for zero-shot semantic segmentation


def whole_image_input(image: np.ndarray, size: int) -> torch.Tensor:
    """Resize the whole (H, W, 3) uint8 image to (3, size, size), normalised with SAM's statistics.

    Unlike ``student_clip_input`` nothing is cropped, so every pixel of the mask has a logit.
    """
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None]  # (1, 3, H, W)
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    return (pixels.clamp(0.0, 255.0) - mean) / std


@torch.inference_mode()
def classification_logits(
    model, images: list[np.ndarray], classifier: torch.Tensor, resolution: int, batch_size: int = 16
) -> torch.Tensor:
    """Return (N, C) zero-shot logits of the student's CLIP head for N images."""
    model.eval()
    logits = []
    for start in range(0, len(images), batch_size):
        inputs = torch.stack([student_clip_input(image, resolution) for image in images[start : start + batch_size]])
        logits.append(classify(model.clip_embedding(inputs), classifier))
    return torch.cat(logits)


def assign_labels(
    probabilities: torch.Tensor,
    class_indices: list[int],
    background_threshold: float | None,
    background_index: int,
) -> np.ndarray:
    """Turn (C', H, W) class probabilities into (H, W) class indices of the full class list.

    Row i of ``probabilities`` is class ``class_indices[i]``. Pixels whose winning probability
    is below ``background_threshold`` get ``background_index`` (-1 when the list has none).
    """
    best, winner = probabilities.max(dim=0)
    labels = torch.tensor(class_indices)[winner]
    if background_threshold is not None:
        labels[best < background_threshold] = background_index
    return labels.numpy()


@torch.inference_mode()
def semantic_segmentation(
    model,
    image: np.ndarray,
    classifier: torch.Tensor,
    class_indices: list[int],
    resolution: int = PAPER_SEGMENTATION_RESOLUTION,
    background_threshold: float | None = None,
    background_index: int = -1,
) -> np.ndarray:
    """Label every pixel of one image with the CLIP head alone; returns (H, W) int64.

    The threshold applies to the softmax over the classifier's rows of the cosine x 100 logits.
    """
    model.eval()
    patches = model.clip_patch_embeddings(whole_image_input(image, resolution)[None])  # (1, h, w, D)
    logits = segment_logits(patches, classifier, image.shape[:2])[0]  # (C', H, W)
    return assign_labels(logits.softmax(dim=0), class_indices, background_threshold, background_index)


@torch.inference_mode()
def text_prompted_segmentation(
    model,
    image: np.ndarray,
    classifier: torch.Tensor,
    class_indices: list[int],
    generator: torch.Generator,
    num_points: int = 3,
    background_threshold: float | None = None,
    background_index: int = -1,
) -> np.ndarray:
    """Label every pixel of one image through both heads; returns (H, W) int64.

    The threshold applies to the winning mask probability, as in ``segment_image_by_text``.
    """
    from samclip.model.text_segmentation import BACKGROUND, segment_image_by_text

    model.eval()
    result = segment_image_by_text(model, image, classifier, generator, num_points, background_threshold)
    lookup = np.asarray(class_indices, dtype=np.int64)
    labels = np.where(result.labels == BACKGROUND, background_index, lookup[np.clip(result.labels, 0, None)])
    return labels.astype(np.int64)


class BoxPromptResult(NamedTuple):
    """Masks and IoUs for K ground-truth instances of one image.

    student_masks, teacher_masks: (K, H, W) bool, the SAM head's and the SAM teacher's masks.
    student_vs_truth, teacher_vs_truth, student_vs_teacher: (K,) IoUs.
    """

    student_masks: torch.Tensor
    teacher_masks: torch.Tensor
    student_vs_truth: torch.Tensor
    teacher_vs_truth: torch.Tensor
    student_vs_teacher: torch.Tensor


def box_prompts(boxes_xyxy: torch.Tensor, image_hw: tuple[int, int], size: int) -> Prompts:
    """Build box-only prompts (1, K) in the SAM input frame from (K, 4) boxes in image pixels."""
    scale = size / max(image_hw)
    count = boxes_xyxy.shape[0]
    return Prompts(
        points=torch.zeros(1, count, 1, 2),
        point_labels=torch.full((1, count, 1), PADDING_LABEL, dtype=torch.long),
        boxes=(boxes_xyxy.float() * scale)[None],
    )


def _masks_in_image(logits: torch.Tensor, size: int, valid_hw: tuple[int, int], image_hw: tuple[int, int]) -> torch.Tensor:
    """Map (K, h, w) low-resolution mask logits to (K, H, W) bool masks, as SAM's postprocess_masks."""
    upscaled = F.interpolate(logits[None].float(), (size, size), mode="bilinear", align_corners=False)
    cropped = upscaled[..., : valid_hw[0], : valid_hw[1]]
    return F.interpolate(cropped, image_hw, mode="bilinear", align_corners=False)[0] > 0


@torch.inference_mode()
def box_prompted_masks(
    model, sam_teacher, image: np.ndarray, truth: torch.Tensor, boxes_xyxy: torch.Tensor
) -> BoxPromptResult:
    """Prompt the student's SAM head and the SAM teacher with the same boxes; score both.

    Args:
        truth: (K, H, W) bool ground-truth masks.
        boxes_xyxy: (K, 4) float boxes (x0, y0, x1, y1) in image pixels.
    """
    from samclip.model.student import decode_masks

    model.eval()
    size = model.arch.sam_resolution
    if sam_teacher.image_encoder.img_size != size:
        raise ValueError(
            f"the student's SAM resolution {size} differs from the teacher's "
            f"{sam_teacher.image_encoder.img_size}; pass the SAM teacher the student was built from"
        )
    pixels, valid_hw = sam_input(image, size)
    prompts = box_prompts(boxes_xyxy, image.shape[:2], size)
    student = model.predict_masks(model.image_embeddings(pixels[None]), prompts).logits[0]
    teacher_embedding = sam_teacher.image_encoder(pixels[None])
    teacher = decode_masks(sam_teacher.prompt_encoder, sam_teacher.mask_decoder, teacher_embedding, prompts).logits[0]
    student_masks = _masks_in_image(student, size, valid_hw, image.shape[:2])
    teacher_masks = _masks_in_image(teacher, size, valid_hw, image.shape[:2])
    truth = truth.bool()
    return BoxPromptResult(
        student_masks=student_masks,
        teacher_masks=teacher_masks,
        student_vs_truth=mask_ious(student_masks, truth),
        teacher_vs_truth=mask_ious(teacher_masks, truth),
        student_vs_teacher=mask_ious(student_masks, teacher_masks),
    )
