from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samclip.model.clip_teacher import ClipTeacher
from samclip.model.zero_shot import (
    OPENAI_TEMPLATES,
    SIMPLE_TEMPLATES,
    build_text_classifier,
    classify,
    segment_logits,
)


def test_templates():
    assert len(OPENAI_TEMPLATES) == 80
    assert all("{c}" in template for template in OPENAI_TEMPLATES)
    assert OPENAI_TEMPLATES[0] == "a bad photo of a {c}."
    assert SIMPLE_TEMPLATES == ("a photo of a {c}.",)


def test_classifier_shape_and_norm(tiny_clip: ClipTeacher):
    names = ["dog", "cat", "car"]
    classifier = build_text_classifier(tiny_clip, names, OPENAI_TEMPLATES[:5], batch_size=4)
    assert classifier.shape == (3, 256)
    assert torch.allclose(classifier.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_classifier_is_mean_of_normalised_texts(tiny_clip: ClipTeacher):
    templates = ("a photo of a {c}.", "a drawing of a {c}.")
    classifier = build_text_classifier(tiny_clip, ["dog"], templates)
    with torch.no_grad():
        tokens = tiny_clip.tokenize(["a photo of a dog.", "a drawing of a dog."])
        texts = tiny_clip.encode_text(tokens)
    expected = F.normalize(F.normalize(texts, dim=-1).mean(dim=0), dim=-1)
    assert torch.allclose(classifier[0], expected, atol=1e-5)


def test_classifier_invalid_templates(tiny_clip: ClipTeacher):
    with pytest.raises(ValueError, match="lack"):
        build_text_classifier(tiny_clip, ["dog"], ["a photo"])
    with pytest.raises(ValueError, match="class_names is empty"):
        build_text_classifier(tiny_clip, [], SIMPLE_TEMPLATES)


def test_classify():
    classifier = F.normalize(torch.eye(3, 4), dim=-1)
    images = torch.tensor([[0.0, 5.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    logits = classify(images, classifier)
    assert logits.shape == (2, 3)
    assert logits.argmax(dim=-1).tolist() == [1, 0]
    assert logits[0, 1].item() == pytest.approx(100.0)
    with pytest.raises(ValueError, match="embedding dim"):
        classify(torch.zeros(2, 5), classifier)


def test_segment_logits():
    classifier = F.normalize(torch.eye(2, 4), dim=-1)
    patches = torch.zeros(1, 2, 2, 4)
    patches[0, 0, :, 0] = 1.0  # top row: class 0
    patches[0, 1, :, 1] = 1.0  # bottom row: class 1
    logits = segment_logits(patches, classifier, (8, 6))
    assert logits.shape == (1, 2, 8, 6)
    labels = logits.argmax(dim=1)[0]
    assert torch.all(labels[:3] == 0)
    assert torch.all(labels[5:] == 1)
