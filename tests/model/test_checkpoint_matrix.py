"""One row per checkpoint form for the SAM and OpenCLIP loaders, each with its documented outcome.

| form                 | SAM (load_sam_checkpoint)             | OpenCLIP (load_clip_teacher)        |
|----------------------|---------------------------------------|-------------------------------------|
| right variant        | loads, weights equal                  | loads (absolute and relative path)  |
| wrong variant        | ValueError "looks like SAM variant X" | ValueError "does not fit"           |
| module. prefix       | loads                                 | loads                               |
| wrapped dicts        | loads ({"model"}, {"state_dict"})     | loads ({"state_dict"})              |
| GPU-saved            | loads on the CPU                      | loads on the CPU                    |
| code-carrying pickle | ValueError "needs code execution"     | ValueError "needs code execution"   |
| truncated file       | ValueError "truncated"                | ValueError "truncated"              |
| folder               | ValueError "is a folder"              | ValueError "is a folder"            |
| wrong format         | ValueError naming the format found    | ValueError naming the format found  |

Files are written with torch.save from state dicts of segment_anything and open_clip models. The
GPU-saved files carry the storage location "cuda:0", as torch.save writes for CUDA tensors.
A torch.serialization tagger writes them, so that no GPU is needed.
transformers is not installed, so the Hugging Face files are state dicts with its key names.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from samclip.model.clip_teacher import TINY_CLIP_CONFIG, load_clip_teacher
from samclip.model.sam_teacher import load_sam_checkpoint


class CodePayload:
    """An object whose unpickling would need this module's code."""


@contextlib.contextmanager
def tagged_as_cuda() -> Iterator[None]:
    """Make torch.save record CPU storages under the location "cuda:0"."""

    def tagger(storage: object) -> str | None:
        return "cuda:0" if getattr(storage, "device", None) == torch.device("cpu") else None

    def deserializer(storage: object, location: str) -> None:
        return None

    torch.serialization.register_package(1, tagger, deserializer)
    try:
        yield
    finally:
        registry = torch.serialization._package_registry
        registry[:] = [entry for entry in registry if entry[1] is not tagger]


def save_gpu_tagged(state: dict, path: Path) -> None:
    with tagged_as_cuda():
        torch.save(state, path)


def truncate(source: Path, path: Path) -> None:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def prefixed(state: dict) -> dict:
    return {f"module.{key}": value for key, value in state.items()}


def plain(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


# each SAM row: form, writer(tmp_path, official_state) -> (path, requested variant), expected error
SamWriter = Callable[[Path, dict], tuple[Path, str]]


def _sam_save(name: str, transform: Callable[[dict], object]) -> SamWriter:
    def write(folder: Path, state: dict) -> tuple[Path, str]:
        torch.save(transform(state), folder / name)
        return folder / name, "tiny"

    return write


def _sam_vit_h_shaped(folder: Path, state: dict) -> tuple[Path, str]:
    # the two keys detect_sam_variant reads, with vit_h's width and depth
    fake = {
        "image_encoder.patch_embed.proj.weight": torch.zeros(1280, 3, 16, 16),
        "image_encoder.blocks.31.norm1.weight": torch.zeros(1280),
    }
    torch.save(fake, folder / "vit_h.pth")
    return folder / "vit_h.pth", "tiny"


def _sam_gpu(folder: Path, state: dict) -> tuple[Path, str]:
    save_gpu_tagged(state, folder / "gpu.pth")
    return folder / "gpu.pth", "tiny"


def _sam_truncated(folder: Path, state: dict) -> tuple[Path, str]:
    torch.save(state, folder / "full.pth")
    truncate(folder / "full.pth", folder / "truncated.pth")
    return folder / "truncated.pth", "tiny"


def _sam_folder(folder: Path, state: dict) -> tuple[Path, str]:
    return folder, "tiny"


def _sam_safetensors(folder: Path, state: dict) -> tuple[Path, str]:
    save_file({key: value.contiguous() for key, value in state.items()}, folder / "sam.pth")
    return folder / "sam.pth", "tiny"


def _sam_hf_transformers(folder: Path, state: dict) -> tuple[Path, str]:
    hf = {
        "vision_encoder.patch_embed.projection.weight": torch.zeros(192, 3, 16, 16),
        "vision_encoder.layers.0.attn.qkv.weight": torch.zeros(576, 192),
        "mask_decoder.iou_token.weight": torch.zeros(1, 128),
    }
    torch.save(hf, folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin", "tiny"


SAM_ROWS: list[tuple[str, SamWriter, str | None]] = [
    ("right_variant", _sam_save("sam.pth", lambda sd: sd), None),
    ("wrong_variant_tiny_as_vit_b", lambda f, sd: (_sam_save("sam.pth", lambda s: s)(f, sd)[0], "vit_b"),
     "looks like SAM variant tiny"),
    ("wrong_variant_vit_h_as_tiny", _sam_vit_h_shaped, "looks like SAM variant vit_h"),
    ("module_prefix", _sam_save("ddp.pth", prefixed), None),
    ("wrapped_model", _sam_save("model.pth", lambda sd: {"model": sd}), None),
    ("wrapped_state_dict", _sam_save("sd.pth", lambda sd: {"state_dict": prefixed(sd)}), None),
    ("gpu_saved", _sam_gpu, None),
    ("code_carrying_pickle", _sam_save("code.pth", lambda sd: {**sd, "extra": CodePayload()}),
     "needs code execution"),
    ("truncated_file", _sam_truncated, "truncated"),
    ("folder", _sam_folder, "is a folder"),
    ("wrong_format_safetensors", _sam_safetensors, "is a safetensors file"),
    ("wrong_format_hf_transformers", _sam_hf_transformers, "Hugging Face transformers SamModel"),
]  # fmt: skip


@pytest.mark.parametrize("form, write, error", SAM_ROWS, ids=[row[0] for row in SAM_ROWS])
def test_sam_checkpoint_form(tmp_path: Path, tiny_sam_path: Path, form, write, error):
    state = plain(tiny_sam_path)
    path, variant = write(tmp_path, state)
    if error is not None:
        with pytest.raises(ValueError, match=error):
            load_sam_checkpoint(path, variant)
        return
    sam = load_sam_checkpoint(path, variant)
    loaded = sam.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)
    assert all(value.device.type == "cpu" for value in loaded.values())


def test_gpu_tagged_file_really_needs_cuda(tmp_path: Path, tiny_sam_path: Path):
    if torch.cuda.is_available():
        pytest.skip("this check proves the tag only on a machine without CUDA")
    save_gpu_tagged(plain(tiny_sam_path), tmp_path / "gpu.pth")
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(tmp_path / "gpu.pth", weights_only=True)


# OpenCLIP rows: writer(tmp_path, weights_path, state) -> (model name, weights path), error
ClipWriter = Callable[[Path, Path, dict], tuple[str, Path]]


def _clip_save(name: str, transform: Callable[[dict], object]) -> ClipWriter:
    def write(folder: Path, weights: Path, state: dict) -> tuple[str, Path]:
        torch.save(transform(state), folder / name)
        return "samclip-tiny-clip", folder / name

    return write


def _clip_relative(folder: Path, weights: Path, state: dict) -> tuple[str, Path]:
    torch.save(state, folder / "relative.bin")
    return "samclip-tiny-clip", Path("relative.bin")


def _clip_wrong_variant(folder: Path, weights: Path, state: dict) -> tuple[str, Path]:
    config = json.loads(json.dumps(TINY_CLIP_CONFIG))
    config["vision_cfg"]["width"] = 128
    (folder / "samclip-narrow-clip.json").write_text(json.dumps(config))
    from samclip.model.clip_teacher import _register_model_config

    _register_model_config("samclip-narrow-clip", folder / "samclip-narrow-clip.json")
    return "samclip-narrow-clip", weights


def _clip_gpu(folder: Path, weights: Path, state: dict) -> tuple[str, Path]:
    save_gpu_tagged(state, folder / "gpu.bin")
    return "samclip-tiny-clip", folder / "gpu.bin"


def _clip_truncated(folder: Path, weights: Path, state: dict) -> tuple[str, Path]:
    truncate(weights, folder / "truncated.bin")
    return "samclip-tiny-clip", folder / "truncated.bin"


def _clip_safetensors_as_bin(folder: Path, weights: Path, state: dict) -> tuple[str, Path]:
    save_file({key: value.contiguous() for key, value in state.items()}, folder / "model.bin")
    return "samclip-tiny-clip", folder / "model.bin"


def _clip_hf_transformers(folder: Path, weights: Path, state: dict) -> tuple[str, Path]:
    hf = {
        "vision_model.embeddings.patch_embedding.weight": torch.zeros(192, 3, 16, 16),
        "text_model.embeddings.token_embedding.weight": torch.zeros(10, 128),
    }
    torch.save(hf, folder / "pytorch_model.bin")
    return "samclip-tiny-clip", folder / "pytorch_model.bin"


CLIP_ROWS: list[tuple[str, ClipWriter, str | None]] = [
    ("right_variant", _clip_save("clip.bin", lambda sd: sd), None),
    ("relative_path", _clip_relative, None),
    ("wrong_variant", _clip_wrong_variant, "does not fit open_clip model samclip-narrow-clip"),
    ("module_prefix", _clip_save("ddp.bin", prefixed), None),
    ("wrapped_state_dict", _clip_save("sd.bin", lambda sd: {"state_dict": sd}), None),
    ("gpu_saved", _clip_gpu, None),
    ("code_carrying_pickle", _clip_save("code.bin", lambda sd: {**sd, "extra": CodePayload()}),
     "needs code execution"),
    ("truncated_file", _clip_truncated, "truncated"),
    ("folder", lambda f, w, sd: ("samclip-tiny-clip", f), "is a folder"),
    ("wrong_format_safetensors_named_bin", _clip_safetensors_as_bin, "is a safetensors file"),
    ("wrong_format_hf_transformers", _clip_hf_transformers, "Hugging Face transformers CLIP"),
]  # fmt: skip


@pytest.mark.parametrize("form, write, error", CLIP_ROWS, ids=[row[0] for row in CLIP_ROWS])
def test_clip_checkpoint_form(tmp_path: Path, monkeypatch, tiny_clip_files, form, write, error):
    _, weights_path, config_path = tiny_clip_files
    state = plain(weights_path)
    monkeypatch.chdir(tmp_path)
    model_name, path = write(tmp_path, weights_path, state)
    config = None if model_name != "samclip-tiny-clip" else config_path
    if error is not None:
        with pytest.raises(ValueError, match=error):
            load_clip_teacher(model_name, path, config)
        return
    teacher = load_clip_teacher(model_name, path, config)
    loaded = teacher.model.state_dict()
    assert all(torch.equal(loaded[key], state[key]) for key in state)
