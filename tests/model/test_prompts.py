from __future__ import annotations

import pytest
import torch

from samclip.model.prompts import prompts_from_masks, sample_prompts


def test_sample_shapes_and_kinds(generator: torch.Generator):
    prompts = sample_prompts(2, 5, [(256, 180), (100, 256)], generator, box_fraction=0.4)
    assert prompts.points.shape == (2, 5, 1, 2)
    assert prompts.point_labels.shape == (2, 5, 1)
    assert prompts.point_labels.dtype == torch.int64
    assert prompts.boxes is not None
    assert prompts.boxes.shape == (2, 5, 4)
    # the first round(5 * 0.4) = 2 prompts are boxes, the rest single foreground points
    assert torch.all(prompts.point_labels[:, :2] == -1)
    assert torch.all(prompts.point_labels[:, 2:] == 1)
    assert torch.all(prompts.boxes[:, :2] >= 0)
    assert torch.all(prompts.boxes[:, 2:] == -1)


def test_sample_inside_valid_area(generator: torch.Generator):
    valid_hw = [(256, 40), (30, 256)]
    prompts = sample_prompts(2, 50, valid_hw, generator)
    for b, (height, width) in enumerate(valid_hw):
        boxes = prompts.boxes[b, :25]
        assert torch.all(boxes[:, 0] <= boxes[:, 2])
        assert torch.all(boxes[:, 1] <= boxes[:, 3])
        assert torch.all(boxes[:, [0, 2]] <= width - 1)
        assert torch.all(boxes[:, [1, 3]] <= height - 1)
        points = prompts.points[b, 25:, 0]
        assert torch.all(points >= 0)
        assert torch.all(points[:, 0] <= width - 1)
        assert torch.all(points[:, 1] <= height - 1)


def test_sample_deterministic():
    first = sample_prompts(2, 4, [(256, 256)] * 2, torch.Generator().manual_seed(3))
    second = sample_prompts(2, 4, [(256, 256)] * 2, torch.Generator().manual_seed(3))
    other = sample_prompts(2, 4, [(256, 256)] * 2, torch.Generator().manual_seed(4))
    for left, right in zip(first, second):
        assert torch.equal(left, right)
    assert not torch.equal(first.points, other.points)


def test_sample_points_only_and_boxes_only(generator: torch.Generator):
    points_only = sample_prompts(1, 3, [(64, 64)], generator, box_fraction=0.0)
    assert points_only.boxes is None
    assert torch.all(points_only.point_labels == 1)
    boxes_only = sample_prompts(1, 3, [(64, 64)], generator, box_fraction=1.0)
    assert torch.all(boxes_only.point_labels == -1)
    assert torch.all(boxes_only.boxes >= 0)


def test_sample_invalid_arguments(generator: torch.Generator):
    with pytest.raises(ValueError, match="batch_size"):
        sample_prompts(2, 4, [(64, 64)], generator)
    with pytest.raises(ValueError, match="box_fraction"):
        sample_prompts(1, 4, [(64, 64)], generator, box_fraction=1.5)
    with pytest.raises(ValueError, match="k must be"):
        sample_prompts(1, 0, [(64, 64)], generator)


def test_prompts_from_masks_box_and_point():
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True  # rows 2-4, columns 3-8
    # an L shape whose centroid lies outside the mask
    masks[1, 0:10, 0:2] = True
    masks[1, 8:10, 0:12] = True
    boxes, points = prompts_from_masks(masks)
    assert boxes[0].tolist() == [3.0, 2.0, 8.0, 4.0]
    assert boxes[1].tolist() == [0.0, 0.0, 11.0, 9.0]
    for mask, (x, y) in zip(masks, points.long().tolist()):
        assert mask[y, x]


def test_prompts_from_empty_mask():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 1, 1] = True
    with pytest.raises(ValueError, match="mask 1 is empty"):
        prompts_from_masks(masks)
