"""Prompts for SAM's mask decoder: sampling for distillation, and prompts from ground-truth masks.

Coordinates are (x, y) pixels in the SAM input frame: the resized image before padding starts at
(0, 0) of the padded square. Every prompt of a batch has P point slots and, when `boxes` is
given, one box slot. Unused slots are marked so that `decode_masks` encodes each prompt as
SamPredictor would encode it alone:
  - a point with label -1 is padding, and a prompt whose points are all padding has no points;
  - a box row of (-1, -1, -1, -1) means the prompt has no box.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

NO_BOX = -1.0  # fill value of every coordinate of an unused box slot
PADDING_LABEL = -1  # label of an unused point slot, as in SAM's prompt encoder


class Prompts(NamedTuple):
    """K prompts for each of B images.

    points: (B, K, P, 2) float (x, y) in the SAM input frame.
    point_labels: (B, K, P) int64; 1 foreground, 0 background, -1 padding.
    boxes: (B, K, 4) float (x1, y1, x2, y2) in the SAM input frame, rows of -1 for no box;
        None when no prompt has a box.
    """

    points: torch.Tensor
    point_labels: torch.Tensor
    boxes: torch.Tensor | None


def sample_prompts(
    batch_size: int,
    k: int,
    valid_hw: list[tuple[int, int]],
    generator: torch.Generator,
    box_fraction: float = 0.5,
) -> Prompts:
    """Sample K prompts per image inside its unpadded area, deterministically given `generator`.

    The first round(k * box_fraction) prompts of each image are boxes without points; the rest
    are single foreground points without boxes. Box sides are uniform between 10% and 100% of
    the image side. Teacher and student must decode the same Prompts object, so that both see
    identical prompts.

    Args:
        valid_hw: the (h, w) of each resized image inside its padded input, as returned by
            images.sam_input.
    """
    if len(valid_hw) != batch_size:
        raise ValueError(f"valid_hw has {len(valid_hw)} entries, expected batch_size={batch_size}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not 0.0 <= box_fraction <= 1.0:
        raise ValueError(f"box_fraction must be within [0, 1], got {box_fraction}")
    num_boxes = round(k * box_fraction)

    points = torch.zeros(batch_size, k, 1, 2)
    labels = torch.full((batch_size, k, 1), PADDING_LABEL, dtype=torch.long)
    boxes = torch.full((batch_size, k, 4), NO_BOX)
    for b, (height, width) in enumerate(valid_hw):
        if height < 1 or width < 1:
            raise ValueError(f"image {b} has an empty valid area {height}x{width}")
        # pixel centres run from 0 to side - 1
        extent = torch.tensor([width - 1, height - 1], dtype=torch.float32)

        # boxes: a size, then a corner that keeps the box inside the image
        sizes = (0.1 + 0.9 * torch.rand(num_boxes, 2, generator=generator)) * extent
        corners = torch.rand(num_boxes, 2, generator=generator) * (extent - sizes)
        boxes[b, :num_boxes] = torch.cat([corners, corners + sizes], dim=1)

        # points: uniform over the image
        num_points = k - num_boxes
        points[b, num_boxes:, 0] = torch.rand(num_points, 2, generator=generator) * extent
        labels[b, num_boxes:, 0] = 1

    return Prompts(points=points, point_labels=labels, boxes=boxes if num_boxes > 0 else None)


def prompts_from_masks(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Derive a box and a centre point from each ground-truth mask.

    Args:
        masks: (K, H, W) bool.

    Returns:
        boxes: (K, 4) float, the tight (x1, y1, x2, y2) pixel box, inclusive as in
            segment_anything's batched_mask_to_box.
        points: (K, 2) float, the mask pixel nearest to the mask's centroid; it lies inside
            the mask even when the centroid does not.
    """
    if masks.ndim != 3:
        raise ValueError(f"expected masks of shape (K, H, W), got {tuple(masks.shape)}")
    masks = masks.bool()
    boxes = torch.zeros(masks.shape[0], 4)
    points = torch.zeros(masks.shape[0], 2)
    for i, mask in enumerate(masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if ys.numel() == 0:
            raise ValueError(f"mask {i} is empty; drop empty masks before building prompts")
        coords = torch.stack([xs, ys], dim=1).float()  # (N, 2) as (x, y)
        boxes[i] = torch.cat([coords.min(dim=0).values, coords.max(dim=0).values])
        centroid = coords.mean(dim=0)
        points[i] = coords[torch.argmin(((coords - centroid) ** 2).sum(dim=1))]
    return boxes, points
