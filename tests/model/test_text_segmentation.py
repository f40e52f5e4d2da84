from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from samclip.model.architectures import build_student
from samclip.model.clip_teacher import ClipTeacher
from samclip.model.images import sam_input
from samclip.model.student import SamClip
from samclip.model.text_segmentation import (
    BACKGROUND,
    labels_from_mask_logits,
    sample_confident_points,
    segment_by_text,
    segment_image_by_text,
)
from samclip.model.zero_shot import SIMPLE_TEMPLATES, build_text_classifier

EMBED_DIM = 256
CLASSES = ["cat", "grass", "sky"]


@pytest.fixture(scope="module")
def student(tiny_sam: Sam) -> SamClip:
    torch.manual_seed(0)
    return build_student("tiny", tiny_sam, EMBED_DIM).eval()


@pytest.fixture(scope="module")
def classifier(tiny_clip: ClipTeacher) -> torch.Tensor:
    return build_text_classifier(tiny_clip, CLASSES, SIMPLE_TEMPLATES)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return data.chelsea()  # (300, 451, 3) uint8


def test_outputs_shapes_and_ranges(student, classifier, generator):
    images = torch.randn(2, 3, 256, 256)
    valid_hw = [(256, 170), (120, 256)]
    result = segment_by_text(student, images, valid_hw, classifier, generator)
    assert result.labels.shape == (2, 256, 256)
    assert result.mask_logits.shape == (2, 3, 64, 64)
    assert result.iou.shape == (2, 3)
    assert result.class_logits.shape == (2, 3, 16, 16)
    assert result.points.shape == (2, 3, 3, 2)
    assert result.point_labels.shape == (2, 3, 3)
    assert torch.isfinite(result.mask_logits).all()
    assert set(result.labels.unique().tolist()) <= {BACKGROUND, 0, 1, 2}
    # padding outside each image is background, the image itself is labelled (no threshold)
    assert (result.labels[0, :, 170:] == BACKGROUND).all()
    assert (result.labels[1, 120:, :] == BACKGROUND).all()
    assert (result.labels[0, :, :170] >= 0).all()
    # points sit at patch centres inside each image's valid patches
    used = result.point_labels == 1
    assert used[..., 0].all()
    for b, (height, width) in enumerate(valid_hw):
        xy = result.points[b][used[b]]
        assert ((xy - 7.5) % 16 == 0).all()
        assert (xy[:, 0] < width + 16).all()
        assert (xy[:, 1] < height + 16).all()


def test_labels_are_argmax_of_masks(student, classifier, generator):
    result = segment_by_text(student, torch.randn(1, 3, 256, 256), [(256, 256)], classifier, generator)
    upscaled = F.interpolate(result.mask_logits, size=(256, 256), mode="bilinear", align_corners=False)
    assert torch.equal(result.labels, upscaled.argmax(dim=1))


def test_masks_match_direct_sam_decoding(student, tiny_sam, classifier, generator):
    images = torch.randn(1, 3, 256, 256)
    result = segment_by_text(student, images, [(256, 256)], classifier, generator)
    with torch.no_grad():
        embedding = tiny_sam.image_encoder(images)
        log_probs = result.class_logits[0].log_softmax(dim=0)
        log_odds = (log_probs - torch.log1p(-log_probs.exp().clamp(max=1 - 1e-7))).clamp(-20, 20)
        mask_input = F.interpolate(log_odds[:, None], size=(64, 64), mode="bilinear", align_corners=False)
        sparse, dense = tiny_sam.prompt_encoder(
            points=(result.points[0], result.point_labels[0]), boxes=None, masks=mask_input
        )
        logits, _ = tiny_sam.mask_decoder(embedding, tiny_sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
    torch.testing.assert_close(result.mask_logits[0], logits[:, 0], rtol=1e-4, atol=1e-4)


def test_seeded_generator_repeats(student, classifier):
    images = torch.randn(1, 3, 256, 256)
    first = segment_by_text(student, images, [(256, 256)], classifier, torch.Generator().manual_seed(3))
    second = segment_by_text(student, images, [(256, 256)], classifier, torch.Generator().manual_seed(3))
    assert torch.equal(first.points, second.points)
    assert torch.equal(first.labels, second.labels)


def test_sampling_proportional_to_confidence():
    # class 0 wins cells (0, 0) and (0, 1) with confidence 0.9 and 0.6; class 1 wins the rest
    confidence = torch.tensor([[[0.9, 0.6], [0.2, 0.1]]])
    confidence = torch.cat([confidence, 1 - confidence])  # (2, 2, 2)
    valid = torch.ones(2, 2, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    draws = 6000
    counts = torch.zeros(2, 2)
    for _ in range(draws):
        cells, labels = sample_confident_points(confidence, valid, 1, generator)
        counts[cells[0, 0, 0], cells[0, 0, 1]] += 1
    assert counts[1].sum() == 0, "class 0 must be sampled only where it wins"
    assert counts[0, 0] / draws == pytest.approx(0.9 / 1.5, abs=0.03)


def test_sampling_class_winning_nowhere():
    confidence = torch.tensor([[[0.3, 0.1], [0.2, 0.4]]])
    confidence = torch.cat([confidence, 1 - confidence])  # class 0 wins no cell
    valid = torch.tensor([[True, True], [True, False]])
    cells, labels = sample_confident_points(confidence, valid, 3, torch.Generator().manual_seed(0))
    assert labels[0].tolist() == [1, 1, 1]
    assert (1, 1) not in [tuple(cell) for cell in cells[0].tolist()], "padding cell sampled"


def test_sampling_fewer_cells_than_points():
    confidence = torch.ones(1, 2, 2)
    valid = torch.tensor([[True, False], [False, False]])
    cells, labels = sample_confident_points(confidence, valid, 3, torch.Generator().manual_seed(0))
    assert labels[0].tolist() == [1, -1, -1]
    assert cells[0, 0].tolist() == [0, 0]


def test_background_threshold():
    logits = torch.tensor([[[[3.0, -3.0]], [[1.0, -1.0]]]])  # (1, C=2, 1, 2)
    plain = labels_from_mask_logits(logits, (1, 2), None)
    assert plain.tolist() == [[[0, 1]]]
    thresholded = labels_from_mask_logits(logits, (1, 2), 0.5)
    assert thresholded.tolist() == [[[0, BACKGROUND]]]


def test_threshold_one_is_all_background(student, classifier, generator):
    result = segment_by_text(
        student, torch.randn(1, 3, 256, 256), [(256, 256)], classifier, generator, background_threshold=1.0
    )
    assert (result.labels == BACKGROUND).all()


def test_single_class_labels_everything(student, classifier, generator):
    result = segment_by_text(student, torch.randn(1, 3, 256, 256), [(256, 256)], classifier[:1], generator)
    assert (result.labels == 0).all()
    assert torch.isfinite(result.mask_logits).all()


def test_invalid_inputs(student, classifier, generator):
    with pytest.raises(ValueError, match="SAM resolution"):
        segment_by_text(student, torch.randn(1, 3, 128, 128), [(128, 128)], classifier, generator)
    with pytest.raises(ValueError, match="num_points"):
        segment_by_text(student, torch.randn(1, 3, 256, 256), [(256, 256)], classifier, generator, 0)
    with pytest.raises(ValueError, match="background_threshold"):
        segment_by_text(
            student, torch.randn(1, 3, 256, 256), [(256, 256)], classifier, generator, 3, 1.5
        )
    with pytest.raises(ValueError, match="valid_hw"):
        segment_by_text(student, torch.randn(1, 3, 256, 256), [], classifier, generator)


def test_real_photo(student, classifier, generator, photo):
    result = segment_image_by_text(student, photo, classifier, generator, num_points=2)
    assert result.labels.shape == photo.shape[:2]
    assert result.labels.min() >= 0
    assert result.labels.max() <= 2
    assert result.points.shape == (3, 2, 2)
    used = result.point_labels == 1
    assert (result.points[used][:, 0] < photo.shape[1] + 16).all()
    assert (result.points[used][:, 1] < photo.shape[0] + 16).all()
    pixels, valid_hw = sam_input(photo, 256)
    assert result.details.labels.shape == (1, 256, 256)
    assert (result.details.labels[0, valid_hw[0]:, :] == BACKGROUND).all()
