from __future__ import annotations

from pathlib import Path

import pytest
import torch
from segment_anything.modeling import Sam

from samclip.model.architectures import build_student
from samclip.model.export import ImageEncoderWithHeads, PromptDecoder, export_torchscript
from samclip.model.student import SamClip

# Traced and eager runs execute the same CPU kernels, so they agree far below this bound. The
# margin allows for a different kernel choice after reloading.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def student(tiny_sam: Sam) -> SamClip:
    torch.manual_seed(0)
    return build_student("tiny", tiny_sam, 256).eval()


@pytest.fixture(scope="module")
def exported(student: SamClip, tmp_path_factory: pytest.TempPathFactory):
    paths = export_torchscript(student, tmp_path_factory.mktemp("export"), num_points=3)
    return torch.jit.load(paths.image_encoder), torch.jit.load(paths.prompt_decoder), paths


def test_files_written(exported):
    _, _, paths = exported
    assert Path(paths.image_encoder).stat().st_size > 0
    assert Path(paths.prompt_decoder).stat().st_size > 0


def test_image_encoder_matches_eager(student, exported):
    encoder, _, _ = exported
    images = torch.randn(2, 3, 256, 256)  # traced with batch 1
    with torch.no_grad():
        expected = ImageEncoderWithHeads(student)(images)
        found = encoder(images)
    names = ("clip_embedding", "clip_patch_embeddings", "image_embeddings")
    for name, left, right in zip(names, expected, found):
        difference = (left - right).abs().max().item()
        print(f"TorchScript image encoder {name}: max abs difference {difference:.3e}")
        assert left.shape == right.shape
        assert difference <= TOLERANCE, name
    with torch.no_grad():
        assert torch.allclose(found[0], student.clip_embedding(images), atol=TOLERANCE)


def test_prompt_decoder_matches_eager(student, exported):
    _, decoder, _ = exported
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(1, 128, 16, 16, generator=generator)
    coords = torch.rand(4, 3, 2, generator=generator) * 255  # traced with N = 2
    labels = torch.tensor([[1, 1, -1], [1, 0, 1], [1, -1, -1], [0, 1, 1]])
    masks = torch.randn(4, 1, 64, 64, generator=generator)
    has_mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    with torch.no_grad():
        expected = PromptDecoder(student)(embedding, coords, labels, masks, has_mask)
        found = decoder(embedding, coords, labels, masks, has_mask)
    for name, left, right in zip(("mask_logits", "iou"), expected, found):
        difference = (left - right).abs().max().item()
        print(f"TorchScript prompt decoder {name}: max abs difference {difference:.3e}")
        assert left.shape == right.shape
        assert difference <= TOLERANCE, name


def test_prompt_decoder_equals_sam_path(student):
    # the export wrapper must decode as SAM's own prompt encoder does, with and without a mask
    embedding = torch.randn(1, 128, 16, 16)
    coords = torch.rand(1, 2, 2) * 255
    labels = torch.tensor([[1, 0]])
    mask = torch.randn(1, 1, 64, 64)
    pe = student.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        for has_mask, masks in ((1.0, mask), (0.0, None)):
            found = PromptDecoder(student)(embedding, coords, labels, mask, torch.tensor([has_mask]))
            sparse, dense = student.prompt_encoder(points=(coords, labels), boxes=None, masks=masks)
            expected = student.mask_decoder(embedding, pe, sparse, dense, False)
            torch.testing.assert_close(found[0], expected[0])
            torch.testing.assert_close(found[1], expected[1])
