"""Zero-shot classification and segmentation with text classifiers from the CLIP teacher.

Templates are format strings with a "{c}" field for the class name.
"""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch
import torch.nn.functional as F

from samclip.model.clip_teacher import ClipTeacher

# OpenAI's 80 ImageNet prompt templates as shipped by open_clip 3.3.0 (as lambdas there).
OPENAI_TEMPLATES: tuple[str, ...] = tuple(
    template("{c}") for template in open_clip.OPENAI_IMAGENET_TEMPLATES
)
SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {c}.",)

# Factor from cosine similarity to logits, the usual scale of CLIP zero-shot logits.
LOGIT_SCALE = 100.0


@torch.no_grad()
def build_text_classifier(
    teacher: ClipTeacher,
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Build a (C, D) zero-shot classifier with unit-norm rows from class names and templates.

    Each class row is the mean over templates of the normalised text embeddings, normalised
    again, as in CLIP's zero-shot evaluation. Texts go through the text encoder in batches of
    `batch_size`.
    """
    if not class_names:
        raise ValueError("class_names is empty; expected at least one class")
    if not templates:
        raise ValueError("templates is empty; use SIMPLE_TEMPLATES or OPENAI_TEMPLATES")
    bad = [template for template in templates if "{c}" not in template]
    if bad:
        raise ValueError(f"templates {bad[:3]} lack the '{{c}}' field for the class name")

    texts = [template.format(c=name) for name in class_names for template in templates]
    embeddings = []
    for start in range(0, len(texts), batch_size):
        tokens = teacher.tokenize(texts[start : start + batch_size])
        embeddings.append(F.normalize(teacher.encode_text(tokens).float(), dim=-1))
    per_text = torch.cat(embeddings).view(len(class_names), len(templates), -1)  # (C, T, D)
    return F.normalize(per_text.mean(dim=1), dim=-1)


def classify(image_embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Score (B, D) image embeddings against a (C, D) classifier: cosine x 100, shape (B, C)."""
    if image_embeddings.shape[-1] != classifier.shape[-1]:
        raise ValueError(
            f"embedding dim {image_embeddings.shape[-1]} differs from the classifier's "
            f"{classifier.shape[-1]}; build the classifier with the same CLIP teacher"
        )
    image_embeddings = F.normalize(image_embeddings.float(), dim=-1)
    return LOGIT_SCALE * image_embeddings @ classifier.float().t()


def segment_logits(
    patch_embeddings: torch.Tensor, classifier: torch.Tensor, out_hw: tuple[int, int]
) -> torch.Tensor:
    """Score each patch (B, h, w, D) against a (C, D) classifier, upscaled to (B, C, H, W).

    Per-patch logits (cosine x 100) are upscaled bilinearly to out_hw = (H, W).
    """
    if patch_embeddings.ndim != 4:
        raise ValueError(
            f"expected patch embeddings (B, h, w, D), got {tuple(patch_embeddings.shape)}"
        )
    logits = classify(patch_embeddings, classifier)  # (B, h, w, C)
    logits = logits.permute(0, 3, 1, 2)  # (B, C, h, w)
    return F.interpolate(logits, size=tuple(out_hw), mode="bilinear", align_corners=False)
