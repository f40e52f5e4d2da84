from __future__ import annotations

import pytest
import segment_anything
import torch
from segment_anything.modeling import Sam

from samclip.model.architectures import build_student
from samclip.model.param_report import (
    build_student_on_meta,
    count_parameters,
    count_student_parameters,
    format_counts,
)

# text-embedding dimension of OpenCLIP ViT-L/14, SAM-CLIP's CLIP teacher
VIT_L_14_EMBED_DIM = 768


@pytest.fixture(scope="module")
def vit_b():
    return build_student_on_meta("vit_b", VIT_L_14_EMBED_DIM)


def test_vit_b_backbone_is_sam_vit_b(vit_b):
    encoder = vit_b.image_encoder
    assert encoder.img_size == 1024
    assert encoder.patch_embed.proj.kernel_size == (16, 16)
    assert encoder.patch_embed.proj.out_channels == 768
    assert len(encoder.blocks) == 12
    windows = [block.window_size for block in encoder.blocks]
    assert [i for i, size in enumerate(windows) if size == 0] == [2, 5, 8, 11]
    assert {size for size in windows if size} == {14}


def test_vit_b_clip_head(vit_b):
    head = vit_b.clip_head
    assert len(head.blocks) == 3
    assert head.pooling == "max"
    last = vit_b.image_encoder.blocks[-1]
    for block in head.blocks:
        assert block.window_size == 0  # global attention, as the backbone's last block
        shapes = {key: value.shape for key, value in block.state_dict().items()}
        assert shapes == {key: value.shape for key, value in last.state_dict().items()}
    assert isinstance(head.norm, torch.nn.LayerNorm)
    linears = [module for module in head.mlp if isinstance(module, torch.nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [
        (768, 768), (768, 768), (768, VIT_L_14_EMBED_DIM),
    ]  # fmt: skip


def test_vit_b_sam_head(vit_b):
    assert vit_b.prompt_encoder.image_embedding_size == (64, 64)
    assert vit_b.prompt_encoder.mask_input_size == (256, 256)
    assert vit_b.mask_decoder.transformer_dim == 256


def test_vit_b_counts_and_head_share(vit_b):
    counts = count_parameters(vit_b)
    print("\n" + format_counts("vit_b", counts))
    assert counts == count_student_parameters("vit_b", VIT_L_14_EMBED_DIM)
    with torch.device("meta"):
        reference = segment_anything.sam_model_registry["vit_b"]()
    assert counts.backbone == sum(p.numel() for p in reference.image_encoder.parameters())
    reference_heads = [reference.prompt_encoder, reference.mask_decoder]
    assert counts.sam_head == sum(p.numel() for m in reference_heads for p in m.parameters())
    assert counts.backbone == 89_670_912
    assert 0.20 < counts.head_share < 0.30, "the CLIP head adds about 25% to a ViT-B"


def test_head_depth_and_pooling_configurable():
    base = count_student_parameters("vit_b", VIT_L_14_EMBED_DIM)
    shallow = count_student_parameters("vit_b", VIT_L_14_EMBED_DIM, clip_head_depth=1)
    per_block = (base.clip_head - shallow.clip_head) // 2
    assert base.backbone == shallow.backbone
    assert per_block == sum(p.numel() for p in build_student_on_meta("vit_b", 768).image_encoder.blocks[-1].parameters())
    mean = build_student_on_meta("vit_b", VIT_L_14_EMBED_DIM, pooling="mean")
    assert mean.clip_head.pooling == "mean"


def test_meta_counts_equal_real_tiny(tiny_sam: Sam):
    real = build_student("tiny", tiny_sam, 256)
    assert count_parameters(real) == count_student_parameters("tiny", 256)


def test_clip_head_blocks_start_as_last_block(tiny_sam: Sam):
    student = build_student("tiny", tiny_sam, 256)
    last = student.image_encoder.blocks[-1].state_dict()
    for block in student.clip_head.blocks:
        assert all(torch.equal(value, last[key]) for key, value in block.state_dict().items())
