"""Evaluation metrics as plain numpy and torch maths: top-k accuracy, confusion matrices, IoU.

Conventions: class indices run from 0 to C - 1; ``ignore_index`` (255 in VOC-style masks)
marks pixels that no metric counts; a predicted label outside [0, C) (such as the background
label -1 of text-prompted segmentation when the class list has no background) counts as a miss
for the pixel's true class and as no prediction for any class.
"""

from __future__ import annotations

import numpy as np
import torch

VOC_IGNORE_INDEX = 255


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Return the share of (N, C) rows whose target is among the k highest logits, per k.

    A k larger than C is clamped to C (top-5 over 3 classes is top-3, i.e. always 1.0).
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("no rows to score: logits has N = 0")
    result = {}
    for k in ks:
        top = logits.topk(min(k, logits.shape[1]), dim=-1).indices  # (N, k)
        result[k] = float((top == targets[:, None]).any(dim=-1).float().mean())
    return result


def confusion_matrix(
    predicted: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None = VOC_IGNORE_INDEX
) -> np.ndarray:
    """Count (C, C + 1) pixels by (true class, predicted class); column C counts invalid predictions.

    Pixels whose target equals ``ignore_index`` or lies outside [0, C) are skipped.
    """
    if predicted.shape != target.shape:
        raise ValueError(f"prediction shape {predicted.shape} differs from the target's {target.shape}")
    target = target.astype(np.int64).ravel()
    predicted = predicted.astype(np.int64).ravel()
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    target, predicted = target[keep], predicted[keep]
    predicted = np.where((predicted >= 0) & (predicted < num_classes), predicted, num_classes)
    counts = np.bincount(target * (num_classes + 1) + predicted, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """Return (C,) IoU = TP / (TP + FP + FN) from a (C, C + 1) confusion matrix; NaN where a class
    is neither present nor predicted."""
    num_classes = confusion.shape[0]
    true_positive = np.diag(confusion[:, :num_classes]).astype(np.float64)
    false_negative = confusion.sum(axis=1) - true_positive
    false_positive = confusion[:, :num_classes].sum(axis=0) - true_positive
    union = true_positive + false_negative + false_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positive / union, np.nan)


def mean_iou(confusion: np.ndarray) -> float:
    """Return the mean IoU over the classes that are present or predicted (NaN-skipping mean)."""
    ious = iou_per_class(confusion)
    return float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan")


def pixel_accuracy(confusion: np.ndarray) -> float:
    total = confusion.sum()
    return float(np.trace(confusion[:, : confusion.shape[0]]) / total) if total else float("nan")


def mask_ious(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return (K,) IoU of K boolean mask pairs of shape (K, H, W); two empty masks count as 1."""
    if predicted.shape != target.shape:
        raise ValueError(f"mask shapes differ: {tuple(predicted.shape)} and {tuple(target.shape)}")
    predicted = predicted.bool().flatten(1)
    target = target.bool().flatten(1)
    intersection = (predicted & target).sum(-1).float()
    union = (predicted | target).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
