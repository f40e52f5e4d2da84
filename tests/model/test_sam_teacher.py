from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import segment_anything
import torch

from samclip.model.sam_teacher import (
    SAM_VARIANTS,
    build_sam,
    detect_sam_variant,
    load_sam_checkpoint,
    save_sam_checkpoint,
    write_random_sam,
)


class CustomPayload:
    """A class that weights-only loading must not instantiate."""

    def __init__(self) -> None:
        self.value = 1


def plain_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_official_variants_match_segment_anything(variant: str):
    builders = segment_anything.sam_model_registry
    with torch.device("meta"):
        ours = build_sam(variant)
        reference = builders[variant]()
    ours_shapes = {key: value.shape for key, value in ours.state_dict().items()}
    reference_shapes = {key: value.shape for key, value in reference.state_dict().items()}
    assert ours_shapes == reference_shapes
    ours_windows = [block.window_size for block in ours.image_encoder.blocks]
    reference_windows = [block.window_size for block in reference.image_encoder.blocks]
    assert ours_windows == reference_windows
    global_blocks = [i for i, size in enumerate(ours_windows) if size == 0]
    assert tuple(global_blocks) == SAM_VARIANTS[variant].encoder_global_attn_indexes


def test_tiny_variant_shapes():
    sam = build_sam("tiny")
    assert sam.image_encoder.img_size == 256
    assert sam.image_encoder.pos_embed.shape == (1, 16, 16, 192)
    assert len(sam.image_encoder.blocks) == 4
    assert [block.window_size for block in sam.image_encoder.blocks] == [8, 0, 8, 0]
    assert sam.prompt_encoder.embed_dim == 128
    assert sam.mask_decoder.transformer_dim == 128
    assert not sam.training


def test_unknown_variant():
    with pytest.raises(ValueError, match="vit_b"):
        build_sam("vit_x")


def test_round_trip(tiny_sam_path: Path):
    sam = load_sam_checkpoint(tiny_sam_path, "tiny")
    assert_same_state(sam.state_dict(), plain_state(tiny_sam_path))
    assert not sam.training


def test_official_layout_keys(tiny_sam_path: Path):
    prefixes = {key.split(".")[0] for key in plain_state(tiny_sam_path)}
    assert prefixes == {"image_encoder", "prompt_encoder", "mask_decoder"}


def test_same_seed_same_bytes(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_random_sam(tmp_path / "a" / "sam.pth", seed=3)
    write_random_sam(tmp_path / "b" / "sam.pth", seed=3)
    assert (tmp_path / "a" / "sam.pth").read_bytes() == (tmp_path / "b" / "sam.pth").read_bytes()


def test_other_seed_other_values(tmp_path: Path):
    write_random_sam(tmp_path / "s0.pth", seed=0)
    write_random_sam(tmp_path / "s1.pth", seed=1)
    key = "image_encoder.patch_embed.proj.weight"
    first = plain_state(tmp_path / "s0.pth")[key]
    assert not torch.equal(first, plain_state(tmp_path / "s1.pth")[key])


def test_random_sam_keeps_global_rng(tmp_path: Path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    write_random_sam(tmp_path / "sam.pth", seed=0)
    assert torch.equal(torch.get_rng_state(), before)


def test_random_sam_position_terms_nonzero(tiny_sam_path: Path):
    state = plain_state(tiny_sam_path)
    assert state["image_encoder.pos_embed"].abs().sum() > 0
    assert state["image_encoder.blocks.0.attn.rel_pos_h"].abs().sum() > 0


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": sd},
        lambda sd: {f"module.{key}": value for key, value in sd.items()},
        lambda sd: {"state_dict": {f"module.{key}": value for key, value in sd.items()}},
    ],
    ids=["model", "state_dict", "ddp_prefix", "state_dict_ddp_prefix"],
)
def test_wrapped_checkpoints_unwrapped(tmp_path: Path, tiny_sam_path: Path, caplog, wrap):
    state = plain_state(tiny_sam_path)
    torch.save(wrap(state), tmp_path / "wrapped.pth")
    with caplog.at_level(logging.INFO, logger="samclip.model.sam_teacher"):
        sam = load_sam_checkpoint(tmp_path / "wrapped.pth", "tiny")
    assert_same_state(sam.state_dict(), state)
    assert caplog.records, "unwrapping should be logged"


def test_load_from_file_object(tiny_sam_path: Path):
    sam = load_sam_checkpoint(io.BytesIO(tiny_sam_path.read_bytes()), "tiny")
    assert_same_state(sam.state_dict(), plain_state(tiny_sam_path))


def test_wrong_variant_names_detected(tiny_sam_path: Path):
    with pytest.raises(ValueError, match="looks like SAM variant tiny"):
        load_sam_checkpoint(tiny_sam_path, "vit_b")


def test_detect_variant(tiny_sam_path: Path):
    assert detect_sam_variant(plain_state(tiny_sam_path)) == "tiny"
    assert detect_sam_variant({}) is None
    state = {"image_encoder.patch_embed.proj.weight": torch.zeros(512, 3, 16, 16)}
    assert detect_sam_variant(state) == "unknown (embed dim 512, depth 0)"


def test_missing_and_unexpected_keys(tmp_path: Path, tiny_sam_path: Path):
    state = plain_state(tiny_sam_path)
    removed = [
        "mask_decoder.iou_token.weight",
        "mask_decoder.mask_tokens.weight",
        "prompt_encoder.not_a_point_embed.weight",
    ]
    for key in removed:
        del state[key]
    state["mask_decoder.extra_a"] = torch.zeros(1)
    state["mask_decoder.extra_b"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as info:
        load_sam_checkpoint(tmp_path / "bad.pth", "tiny")
    message = str(info.value)
    assert "3 missing keys" in message
    assert "2 unexpected keys" in message
    assert "mask_decoder.iou_token.weight" in message
    assert "mask_decoder.extra_a" in message


def test_shape_mismatch(tmp_path: Path, tiny_sam_path: Path):
    state = plain_state(tiny_sam_path)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 64)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="size mismatch"):
        load_sam_checkpoint(tmp_path / "bad.pth", "tiny")


def test_pickle_needing_code_rejected(tmp_path: Path):
    torch.save({"payload": CustomPayload()}, tmp_path / "code.pth")
    with pytest.raises(ValueError, match="needs code execution"):
        load_sam_checkpoint(tmp_path / "code.pth", "tiny")


def test_truncated_file(tmp_path: Path, tiny_sam_path: Path):
    data = tiny_sam_path.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.pth"):
        load_sam_checkpoint(path, "tiny")


def test_garbage_file(tmp_path: Path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint at all" * 20)
    with pytest.raises(ValueError, match="garbage.pth"):
        load_sam_checkpoint(path, "tiny")


def test_folder_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="folder"):
        load_sam_checkpoint(tmp_path, "tiny")


def test_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_sam_checkpoint(tmp_path / "nothing.pth", "tiny")


def test_non_dict_rejected(tmp_path: Path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_sam_checkpoint(tmp_path / "list.pth", "tiny")


def test_save_round_trip(tmp_path: Path, tiny_sam):
    save_sam_checkpoint(tiny_sam, tmp_path / "saved.pth")
    assert_same_state(plain_state(tmp_path / "saved.pth"), tiny_sam.state_dict())
