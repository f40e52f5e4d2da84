from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from samclip.model.clip_teacher import (
    TINY_CLIP_CONFIG,
    ClipTeacher,
    clip_input,
    load_clip_teacher,
    write_random_clip,
)


def test_write_random_clip_files(tiny_clip_files):
    model_name, weights_path, config_path = tiny_clip_files
    assert model_name == "samclip-tiny-clip"
    assert json.loads(config_path.read_text()) == TINY_CLIP_CONFIG
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    assert "visual.conv1.weight" in state
    assert "token_embedding.weight" in state


def test_teacher_attributes(tiny_clip: ClipTeacher):
    assert tiny_clip.model_name == "samclip-tiny-clip"
    assert tiny_clip.embed_dim == 256
    assert tiny_clip.image_size == 224
    assert tiny_clip.preprocess_cfg == {
        "mean": pytest.approx([0.48145466, 0.4578275, 0.40821073]),
        "std": pytest.approx([0.26862954, 0.26130258, 0.27577711]),
        "size": 224,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def test_teacher_frozen(tiny_clip: ClipTeacher):
    assert not any(parameter.requires_grad for parameter in tiny_clip.parameters())
    tiny_clip.train()
    assert not tiny_clip.training
    assert not tiny_clip.model.training


def test_weights_loaded_exactly(tiny_clip: ClipTeacher, tiny_clip_files):
    _, weights_path, _ = tiny_clip_files
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    loaded = tiny_clip.model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_encode_shapes_not_normalised(tiny_clip: ClipTeacher):
    with torch.no_grad():
        images = tiny_clip.encode_image(torch.randn(2, 3, 224, 224))
        texts = tiny_clip.encode_text(tiny_clip.tokenize(["a photo of a dog.", "a cat"]))
    assert images.shape == (2, 256)
    assert texts.shape == (2, 256)
    assert torch.isfinite(images).all()
    assert not torch.allclose(images.norm(dim=-1), torch.ones(2))


def test_tokenizer_truncates_long_text(tiny_clip: ClipTeacher):
    tokens = tiny_clip.tokenize(["a very long prompt " * 100, "short"])
    assert tokens.shape == (2, 77)
    assert tokens.dtype == torch.int64
    eot = tokens[1].max().item()  # the end-of-text id is the largest id in a short text
    assert tokens[0, -1].item() == eot
    assert (tokens[0] != 0).all()


def test_same_seed_same_weights(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        folder_path = tmp_path / folder
        write_random_clip(folder_path / "seeded-clip.json", folder_path / "w.bin", seed=5)
    left = torch.load(tmp_path / "a" / "w.bin", weights_only=True)
    right = torch.load(tmp_path / "b" / "w.bin", weights_only=True)
    assert all(torch.equal(left[key], right[key]) for key in left)


def test_hf_transformers_file_rejected(tmp_path: Path, tiny_clip_files):
    model_name, _, config_path = tiny_clip_files
    torch.save(
        {
            "vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 16, 16),
            "text_model.embeddings.token_embedding.weight": torch.zeros(10, 4),
            "logit_scale": torch.zeros(()),
        },
        tmp_path / "pytorch_model.bin",
    )
    with pytest.raises(ValueError, match="Hugging Face transformers"):
        load_clip_teacher(model_name, tmp_path / "pytorch_model.bin", config_path)


def test_folder_rejected(tmp_path: Path, tiny_clip_files):
    model_name, _, config_path = tiny_clip_files
    with pytest.raises(ValueError, match="folder"):
        load_clip_teacher(model_name, tmp_path, config_path)


def test_missing_weights(tmp_path: Path, tiny_clip_files):
    model_name, _, config_path = tiny_clip_files
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        load_clip_teacher(model_name, tmp_path / "absent.bin", config_path)


def test_missing_keys_reported(tmp_path: Path, tiny_clip_files):
    model_name, weights_path, config_path = tiny_clip_files
    state = torch.load(weights_path, weights_only=True)
    del state["visual.conv1.weight"]
    torch.save(state, tmp_path / "partial.bin")
    with pytest.raises(ValueError, match="1 missing keys"):
        load_clip_teacher(model_name, tmp_path / "partial.bin", config_path)


def test_wrapped_state_dict_loads(tmp_path: Path, tiny_clip_files):
    model_name, weights_path, config_path = tiny_clip_files
    state = torch.load(weights_path, weights_only=True)
    wrapped = {"epoch": 3, "state_dict": {f"module.{key}": value for key, value in state.items()}}
    torch.save(wrapped, tmp_path / "epoch_3.pt")
    teacher = load_clip_teacher(model_name, tmp_path / "epoch_3.pt", config_path)
    loaded = teacher.model.state_dict()
    assert torch.equal(loaded["visual.conv1.weight"], state["visual.conv1.weight"])


def test_safetensors_weights(tmp_path: Path, tiny_clip_files):
    from safetensors.torch import save_file

    model_name, weights_path, config_path = tiny_clip_files
    state = torch.load(weights_path, weights_only=True)
    save_file({key: value.contiguous() for key, value in state.items()}, tmp_path / "w.safetensors")
    teacher = load_clip_teacher(model_name, tmp_path / "w.safetensors", config_path)
    loaded = teacher.model.state_dict()
    assert torch.equal(loaded["visual.conv1.weight"], state["visual.conv1.weight"])


def test_config_stem_must_match_name(tiny_clip_files):
    _, weights_path, config_path = tiny_clip_files
    with pytest.raises(ValueError, match="file stem"):
        load_clip_teacher("other-name", weights_path, config_path)


def test_invalid_config_rejected(tmp_path: Path, tiny_clip_files):
    _, weights_path, _ = tiny_clip_files
    config_path = tmp_path / "broken-clip.json"
    config_path.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match="vision_cfg"):
        load_clip_teacher("broken-clip", weights_path, config_path)


def test_unknown_model_name(tiny_clip_files):
    _, weights_path, _ = tiny_clip_files
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_clip_teacher("no-such-clip-model", weights_path)


def test_random_init_warning_silenced(tiny_clip_files, caplog):
    model_name, weights_path, config_path = tiny_clip_files
    with caplog.at_level(logging.WARNING):
        load_clip_teacher(model_name, weights_path, config_path)
    assert not [record for record in caplog.records if "No pretrained" in record.getMessage()]


def test_clip_input(tiny_clip: ClipTeacher):
    image = np.random.default_rng(0).integers(0, 256, (120, 300, 3), dtype=np.uint8)
    tensor = clip_input(image, tiny_clip)
    assert tensor.shape == (3, 224, 224)
    assert tensor.dtype == torch.float32
    with pytest.raises(ValueError, match="RGB"):
        clip_input(image[..., 0], tiny_clip)


def test_pretrained_preprocessing_from_tag():
    from samclip.model.clip_teacher import pretrained_preprocess_cfg

    siglip = pretrained_preprocess_cfg("ViT-B-16-SigLIP", None)  # every tag uses mean 0.5
    assert siglip["mean"] == pytest.approx([0.5, 0.5, 0.5])
    assert siglip["std"] == pytest.approx([0.5, 0.5, 0.5])
    datacomp = pretrained_preprocess_cfg("ViT-L-14", "datacomp_xl_s13b_b90k")
    assert datacomp["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert datacomp["resize_mode"] == "shortest"


def test_pretrained_tags_disagreeing_warn(caplog):
    from samclip.model.clip_teacher import pretrained_preprocess_cfg

    with caplog.at_level(logging.WARNING, logger="samclip.model.clip_teacher"):
        assert pretrained_preprocess_cfg("ViT-L-14", None) is None
    assert "pretrained=" in caplog.text


def test_unknown_pretrained_tag_rejected(tiny_clip_files):
    model_name, weights_path, config_path = tiny_clip_files
    with pytest.raises(ValueError, match="not an open_clip pretrained tag"):
        load_clip_teacher(model_name, weights_path, config_path, pretrained="openai")
