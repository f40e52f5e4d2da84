from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from samclip.model.architectures import (
    STUDENT_ARCHS,
    build_student,
    build_student_random,
    get_student_arch,
)
from samclip.model.clip_head import ClipHead
from samclip.model.prompts import Prompts, sample_prompts
from samclip.model.sam_teacher import build_sam
from samclip.model.student import SamClip, decode_masks

EMBED_DIM = 256


@pytest.fixture(scope="module")
def student(tiny_sam: Sam) -> SamClip:
    torch.manual_seed(0)
    return build_student("tiny", tiny_sam, EMBED_DIM)


def teacher_masks(sam: Sam, embedding: torch.Tensor, points, boxes, multimask: bool = False):
    """Decode one image's prompts the way SamPredictor.predict_torch does."""
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    return sam.mask_decoder(
        image_embeddings=embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )


def test_registry():
    assert STUDENT_ARCHS["tiny"].sam_resolution == 256
    assert STUDENT_ARCHS["tiny"].clip_resolution == 128
    assert STUDENT_ARCHS["vit_b"].sam_resolution == 1024
    assert STUDENT_ARCHS["vit_b"].clip_resolution == 224
    for arch in STUDENT_ARCHS.values():
        assert (arch.clip_head_depth, arch.pooling, arch.mlp_hidden_layers) == (3, "max", 2)
    assert get_student_arch("tiny", clip_head_depth=1, pooling="mean").clip_head_depth == 1
    with pytest.raises(ValueError, match="tiny"):
        get_student_arch("vit_q")


@pytest.mark.parametrize("size", [128, 256])
def test_output_shapes(student: SamClip, size: int):
    images = torch.randn(2, 3, size, size)
    grid = size // 16
    with torch.no_grad():
        tokens = student.backbone_tokens(images)
        output = student(images)
        patches = student.clip_patch_embeddings(images)
        pooled = student.clip_embedding(images)
    assert tokens.shape == (2, grid, grid, 192)
    assert output.clip_embedding.shape == (2, EMBED_DIM)
    assert output.image_embeddings.shape == (2, 128, grid, grid)
    assert patches.shape == (2, grid, grid, EMBED_DIM)
    assert torch.equal(pooled, output.clip_embedding)
    for tensor in (tokens, output.clip_embedding, output.image_embeddings, patches):
        assert torch.isfinite(tensor).all()


def test_mask_shapes(student: SamClip, generator: torch.Generator):
    prompts = sample_prompts(2, 5, [(256, 180), (120, 256)], generator)
    with torch.no_grad():
        embeddings = student.image_embeddings(torch.randn(2, 3, 256, 256))
        single = student.predict_masks(embeddings, prompts)
        multi = student.predict_masks(embeddings, prompts, multimask_output=True)
    assert single.logits.shape == (2, 5, 64, 64)
    assert single.iou.shape == (2, 5)
    assert multi.logits.shape == (2, 5, 3, 64, 64)
    assert multi.iou.shape == (2, 5, 3)
    assert torch.isfinite(single.logits).all()
    assert torch.isfinite(multi.logits).all()


def test_image_embeddings_equal_teacher(student: SamClip, tiny_sam: Sam):
    images = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(student.image_embeddings(images), tiny_sam.image_encoder(images))
        assert torch.equal(student(images).image_embeddings, tiny_sam.image_encoder(images))


def test_point_masks_equal_teacher(student: SamClip, tiny_sam: Sam, generator: torch.Generator):
    prompts = sample_prompts(2, 4, [(256, 256), (200, 256)], generator, box_fraction=0.0)
    assert prompts.boxes is None
    with torch.no_grad():
        embeddings = tiny_sam.image_encoder(torch.randn(2, 3, 256, 256))
        predicted = student.predict_masks(embeddings, prompts)
        for b in range(2):
            points = (prompts.points[b], prompts.point_labels[b])
            logits, iou = teacher_masks(tiny_sam, embeddings[b : b + 1], points, None)
            assert torch.equal(predicted.logits[b], logits[:, 0])
            assert torch.equal(predicted.iou[b], iou[:, 0])


def test_mixed_masks_equal_teacher(student: SamClip, tiny_sam: Sam, generator: torch.Generator):
    prompts = sample_prompts(1, 6, [(256, 240)], generator, box_fraction=0.5)
    with torch.no_grad():
        embeddings = tiny_sam.image_encoder(torch.randn(1, 3, 256, 256))
        predicted = student.predict_masks(embeddings, prompts, multimask_output=True)
        box_logits, box_iou = teacher_masks(tiny_sam, embeddings, None, prompts.boxes[0, :3], True)
        points = (prompts.points[0, 3:], prompts.point_labels[0, 3:])
        point_logits, point_iou = teacher_masks(tiny_sam, embeddings, points, None, True)
    assert torch.equal(predicted.logits[0, :3], box_logits)
    assert torch.equal(predicted.iou[0, :3], box_iou)
    assert torch.equal(predicted.logits[0, 3:], point_logits)
    assert torch.equal(predicted.iou[0, 3:], point_iou)


def test_box_with_points_prompt(student: SamClip, tiny_sam: Sam):
    prompts = Prompts(
        points=torch.tensor([[[[50.0, 60.0], [0.0, 0.0]]]]),
        point_labels=torch.tensor([[[1, -1]]]),
        boxes=torch.tensor([[[10.0, 20.0, 120.0, 130.0]]]),
    )
    with torch.no_grad():
        embeddings = tiny_sam.image_encoder(torch.randn(1, 3, 256, 256))
        predicted = decode_masks(
            tiny_sam.prompt_encoder, tiny_sam.mask_decoder, embeddings, prompts
        )
        points = (prompts.points[0], prompts.point_labels[0])
        logits, _ = teacher_masks(tiny_sam, embeddings, points, prompts.boxes[0])
    assert torch.equal(predicted.logits[0], logits[:, 0])


def test_prompt_without_point_or_box_rejected(student: SamClip):
    prompts = Prompts(
        points=torch.zeros(1, 1, 1, 2),
        point_labels=torch.full((1, 1, 1), -1),
        boxes=None,
    )
    with pytest.raises(ValueError, match="neither a point"):
        student.predict_masks(torch.zeros(1, 128, 16, 16), prompts)


def test_embedding_batch_must_match_prompts(student: SamClip, generator: torch.Generator):
    prompts = sample_prompts(2, 2, [(256, 256)] * 2, generator)
    with pytest.raises(ValueError, match="match the prompts"):
        student.predict_masks(torch.zeros(3, 128, 16, 16), prompts)


def test_clip_head_blocks_equal_last_block(student: SamClip, tiny_sam: Sam):
    last = tiny_sam.image_encoder.blocks[-1].state_dict()
    assert len(student.clip_head.blocks) == 3
    for block in student.clip_head.blocks:
        assert block.window_size == 0
        state = block.state_dict()
        assert state.keys() == last.keys()
        assert all(torch.equal(state[key], last[key]) for key in last)


def test_clip_head_parameters(student: SamClip):
    names = {
        ".".join(name.split(".")[:2]) for name, _ in student.clip_head.named_parameters()
    }
    assert names == {
        "blocks.0", "blocks.1", "blocks.2", "norm.weight", "norm.bias",
        "mlp.0", "mlp.2", "mlp.4",
    }  # fmt: skip
    linear_layers = [layer for layer in student.clip_head.mlp if hasattr(layer, "weight")]
    shapes = [tuple(layer.weight.shape) for layer in linear_layers]
    assert shapes == [(192, 192), (192, 192), (EMBED_DIM, 192)]


def test_student_modules_are_copies(student: SamClip, tiny_sam: Sam):
    assert student.image_encoder is not tiny_sam.image_encoder
    assert student.prompt_encoder is not tiny_sam.prompt_encoder
    assert student.mask_decoder is not tiny_sam.mask_decoder
    shared = {p.data_ptr() for p in tiny_sam.parameters()}
    assert not any(p.data_ptr() in shared for p in student.parameters())


def test_head_deterministic_given_seed(tiny_sam: Sam):
    torch.manual_seed(7)
    first = build_student("tiny", tiny_sam, EMBED_DIM)
    torch.manual_seed(7)
    second = build_student("tiny", tiny_sam, EMBED_DIM)
    for (name, left), (_, right) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(left, right), name


def test_overrides(tiny_sam: Sam):
    student = build_student(
        "tiny", tiny_sam, 64, clip_head_depth=1, pooling="mean", mlp_hidden_layers=1
    )
    assert len(student.clip_head.blocks) == 1
    assert student.clip_head.pooling == "mean"
    assert len(student.clip_head.mlp) == 3
    assert student.arch.clip_head_depth == 1
    assert student.embed_dim == 64
    with torch.no_grad():
        assert student.clip_embedding(torch.randn(1, 3, 128, 128)).shape == (1, 64)


def test_max_and_mean_pooling_differ(student: SamClip):
    tokens = torch.randn(1, 4, 4, 192)
    head_mean = ClipHead(student.image_encoder.blocks[-1], EMBED_DIM, depth=1, pooling="mean")
    with torch.no_grad():
        blocks_out = head_mean.blocks[0](tokens).flatten(1, 2)
        expected = head_mean.mlp(head_mean.norm(blocks_out.mean(dim=1)))
        assert torch.allclose(head_mean(tokens), expected)
        head_mean.pooling = "max"
        expected_max = head_mean.mlp(head_mean.norm(blocks_out.amax(dim=1)))
        assert torch.allclose(head_mean(tokens), expected_max)


def test_position_embedding_interpolated(student: SamClip):
    images = torch.randn(1, 3, 128, 128)
    encoder = student.image_encoder
    with torch.no_grad():
        tokens = encoder.patch_embed(images)
        position = F.interpolate(
            encoder.pos_embed.permute(0, 3, 1, 2), size=(8, 8), mode="bicubic", align_corners=False
        ).permute(0, 2, 3, 1)
        tokens = tokens + position
        for block in encoder.blocks:
            tokens = block(tokens)
        assert torch.equal(student.backbone_tokens(images), tokens)


def test_wrong_sam_for_arch():
    with torch.device("meta"):
        sam = build_sam("vit_b")
    with pytest.raises(ValueError, match="needs SAM tiny"):
        build_student("tiny", sam, EMBED_DIM)


def test_input_not_multiple_of_patch(student: SamClip):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        student.backbone_tokens(torch.randn(1, 3, 100, 128))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        student.backbone_tokens(torch.randn(3, 128, 128))


def test_gradients_reach_backbone_and_heads(tiny_sam: Sam):
    student = build_student("tiny", tiny_sam, EMBED_DIM).train()
    output = student(torch.randn(1, 3, 128, 128))
    (output.clip_embedding.sum() + output.image_embeddings.sum()).backward()
    assert student.image_encoder.patch_embed.proj.weight.grad is not None
    assert student.clip_head.mlp[-1].weight.grad is not None
    assert student.image_encoder.neck[0].weight.grad is not None


def test_build_student_random():
    student = build_student_random("tiny", EMBED_DIM)
    assert isinstance(student, SamClip)
    assert student.arch == STUDENT_ARCHS["tiny"]
    with torch.no_grad():
        assert student(torch.randn(1, 3, 256, 256)).image_embeddings.shape == (1, 128, 16, 16)
