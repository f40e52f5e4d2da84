"""Overlay pictures for evaluation reports: zero-shot segmentation and SAM masks over the photo."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display on workers or servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402


def _palette(count: int) -> np.ndarray:
    cmap = plt.get_cmap("tab20")
    return np.array([cmap(i % 20)[:3] for i in range(count)])


def render_overlay(
    image: np.ndarray,
    class_map: np.ndarray,
    class_names: list[str],
    student_masks: np.ndarray,
    teacher_masks: np.ndarray,
    boxes: list[list[float] | None],
    points: list[list[float] | None],
    title: str,
) -> bytes:
    """Draw three panels and return PNG bytes.

    Args:
        image: (H, W, 3) uint8 photo.
        class_map: (H, W) int class index per pixel from zero-shot segmentation.
        class_names: names of the class indices.
        student_masks: (K, H, W) bool masks of the student for K prompts.
        teacher_masks: (K, H, W) bool masks of the SAM teacher for the same prompts.
        boxes, points: per prompt, a box (x0, y0, x1, y1) or a point (x, y) in image pixels.
    """
    colours = _palette(max(len(class_names), 1))
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4))

    axes[0].imshow(image)
    axes[0].set_title(title, fontsize=9)

    seg = colours[class_map]
    axes[1].imshow(image)
    axes[1].imshow(seg, alpha=0.5)
    present = [int(c) for c in np.unique(class_map)]
    handles = [Patch(color=colours[c], label=class_names[c]) for c in present[:8]]
    axes[1].legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.7)
    axes[1].set_title("zero-shot segmentation (CLIP head)", fontsize=9)

    mask_colours = _palette(len(student_masks) + 1)
    layer = np.zeros((*image.shape[:2], 4))
    for k, mask in enumerate(student_masks):
        layer[mask] = [*mask_colours[k], 0.45]
    axes[2].imshow(image)
    axes[2].imshow(layer)
    for k, mask in enumerate(teacher_masks):
        if mask.any():
            axes[2].contour(mask.astype(float), levels=[0.5], colors=[mask_colours[k]], linewidths=0.8)
        if boxes[k] is not None:
            x0, y0, x1, y1 = boxes[k]
            axes[2].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=mask_colours[k], lw=1))
        if points[k] is not None:
            axes[2].plot(points[k][0], points[k][1], marker="*", color="white", markeredgecolor="black", ms=9)
    axes[2].set_title("SAM head masks (fill) vs SAM teacher (contour)", fontsize=9)

    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def render_label_panels(image: np.ndarray, panels: list[tuple[str, np.ndarray]], class_names: list[str]) -> bytes:
    """Draw the photo, then one panel per (title, (H, W) label map) over it; returns PNG bytes.

    Labels outside [0, len(class_names)), such as -1 for background or 255 for ignored pixels,
    are left transparent.
    """
    colours = _palette(max(len(class_names), 1))
    figure, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 4.4))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    present: set[int] = set()
    for axis, (title, labels) in zip(axes[1:], panels):
        valid = (labels >= 0) & (labels < len(class_names))
        layer = np.zeros((*labels.shape, 4))
        layer[valid, :3] = colours[labels[valid]]
        layer[valid, 3] = 0.55
        axis.imshow(image)
        axis.imshow(layer)
        axis.set_title(title, fontsize=9)
        present.update(int(c) for c in np.unique(labels[valid]))
    handles = [Patch(color=colours[c], label=class_names[c]) for c in sorted(present)[:10]]
    if handles:
        axes[-1].legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.7)
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()
