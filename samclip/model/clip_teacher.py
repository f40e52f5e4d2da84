"""The frozen OpenCLIP teacher: an open_clip model name, or a JSON config, plus a weights file.

Custom architectures are registered with `open_clip.add_model_config`, open_clip's own mechanism
for model configs outside the package. It keys the config by the JSON file's stem, so the model
name must equal that stem (for example samclip-tiny-clip.json contains model samclip-tiny-clip).
The JSON is a plain open_clip model config, like the files in open_clip/model_configs. That format
has no preprocessing fields, so such models use open_clip's PreprocessCfg defaults: OpenAI CLIP
mean and std, bicubic interpolation, resize of the shortest side, and the model's image size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import open_clip
import torch
from open_clip.factory import load_state_dict as _open_clip_load_state_dict
from PIL import Image
from torch import nn

from samclip.model.sam_teacher import describe_key_mismatch, load_weights_file, unwrap_state_dict

logger = logging.getLogger(__name__)

# A small ViT CLIP for CPU smoke runs and tests (patch 16 at 224 px: 14x14 tokens).
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 256,
    "vision_cfg": {
        "image_size": 224,
        "layers": 4,
        "width": 192,
        "patch_size": 16,
        "head_width": 64,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3},
}

# Key prefixes of a Hugging Face transformers CLIPModel state dict.
_HF_TRANSFORMERS_PREFIXES = ("vision_model.", "text_model.")


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    # open_clip 3.3.0 warns on the root logger whenever create_model runs without pretrained
    # weights. The callers here load the weights right after, so the warning is false.
    message_filter = _DropMessage("No pretrained weights loaded")
    root = logging.getLogger()
    root.addFilter(message_filter)
    try:
        yield
    finally:
        root.removeFilter(message_filter)


class ClipTeacher(nn.Module):
    """A frozen open_clip model with its tokenizer and evaluation transform.

    The module stays in eval mode and its parameters do not require gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        model_name: str,
        tokenizer: Callable[[list[str]], torch.Tensor],
        embed_dim: int,
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.embed_dim = embed_dim

        config = open_clip.get_model_preprocess_cfg(model)
        size = config["size"]
        self.image_size = size if isinstance(size, int) else int(size[0])
        # mean, std, size, interpolation and resize_mode; part of every teacher fingerprint
        self.preprocess_cfg: dict[str, Any] = {
            "mean": [float(v) for v in config["mean"]],
            "std": [float(v) for v in config["std"]],
            "size": self.image_size,
            "interpolation": config.get("interpolation", "bicubic"),
            "resize_mode": config.get("resize_mode", "shortest"),
        }
        self.preprocess = open_clip.image_transform(
            self.image_size,
            is_train=False,
            mean=tuple(self.preprocess_cfg["mean"]),
            std=tuple(self.preprocess_cfg["std"]),
            interpolation=self.preprocess_cfg["interpolation"],
            resize_mode=self.preprocess_cfg["resize_mode"],
        )

    def train(self, mode: bool = True) -> ClipTeacher:
        """Keep the frozen teacher in eval mode whatever `mode` is."""
        return super().train(False)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Embed (B, 3, S, S) preprocessed images into (B, D), not normalised."""
        return self.model.encode_image(images, normalize=False)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embed (B, L) token ids into (B, D), not normalised."""
        return self.model.encode_text(tokens, normalize=False)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Tokenize texts into (B, L) int64 ids; open_clip truncates texts longer than L."""
        return self.tokenizer(list(texts)).long()


def _register_model_config(model_name: str, config_path: Path) -> None:
    if config_path.is_dir():
        raise ValueError(f"model config {config_path} is a folder; expected an open_clip JSON file")
    if not config_path.is_file():
        raise FileNotFoundError(f"open_clip model config not found: {config_path}")
    if config_path.stem != model_name:
        raise ValueError(
            f"model name {model_name!r} differs from the config file stem {config_path.stem!r}; "
            "open_clip registers a JSON config under its file stem, so rename one to match"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"model config {config_path} is not valid JSON: {e}") from e
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        raise ValueError(
            f"model config {config_path} lacks {missing}; expected a plain open_clip model config "
            "with embed_dim, vision_cfg and text_cfg"
        )
    if open_clip.get_model_config(model_name) != config:
        open_clip.add_model_config(config_path)


def _load_clip_state_dict(weights_path: Path) -> dict[str, torch.Tensor]:
    name = os.fspath(weights_path)
    if weights_path.suffix == ".safetensors" and weights_path.is_file():
        try:
            checkpoint: object = _open_clip_load_state_dict(name, device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{name} is not a valid safetensors file: {e}") from e
    else:
        checkpoint = load_weights_file(weights_path)
    state_dict = unwrap_state_dict(checkpoint, name, "visual.")

    if any(key.startswith(_HF_TRANSFORMERS_PREFIXES) for key in state_dict):
        raise ValueError(
            f"{name} is a Hugging Face transformers CLIP state dict (keys vision_model.*, "
            "text_model.*); expected an open_clip state dict (keys visual.*, transformer.*, "
            "token_embedding.*). Use the repository's open_clip_pytorch_model.bin or "
            "open_clip_model.safetensors instead"
        )
    return state_dict


def pretrained_preprocess_cfg(model_name: str, pretrained: str | None) -> dict[str, Any] | None:
    """Return the image preprocessing of an open_clip pretrained tag: mean, std and resizing.

    With `pretrained` None, the preprocessing that every pretrained tag of the model shares is
    returned, and None when the model has no tags or its tags disagree (a warning names them).
    open_clip.create_model with pretrained=None would otherwise use OpenAI CLIP's mean and std,
    which is wrong for models such as ViT-B-16-SigLIP (mean and std 0.5).

    Raises:
        ValueError: `pretrained` is not a tag of the model.
    """
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained is not None and pretrained not in tags:
        raise ValueError(
            f"{pretrained!r} is not an open_clip pretrained tag of {model_name}; expected one of "
            f"{tags} (open_clip.list_pretrained_tags_by_model), or no tag for a custom model"
        )
    keys = ("mean", "std", "interpolation", "resize_mode")
    configs = {}
    for tag in [pretrained] if pretrained is not None else tags:
        config = open_clip.get_pretrained_cfg(model_name, tag)
        configs[tag] = {key: config[key] for key in keys if config.get(key) is not None}
    distinct = {json.dumps(config, sort_keys=True) for config in configs.values()}
    if len(distinct) == 1:
        return next(iter(configs.values())) or None
    if len(distinct) > 1:
        logger.warning(
            "the pretrained tags of %s use different image preprocessing (%s); open_clip's "
            "defaults are used. Pass the tag of the weights (pretrained=...) to use theirs",
            model_name, ", ".join(sorted(configs)),
        )  # fmt: skip
    return None


def load_clip_teacher(
    model_name: str,
    weights_path: str | os.PathLike,
    model_config_path: str | os.PathLike | None = None,
    pretrained: str | None = None,
) -> ClipTeacher:
    """Build an open_clip model and load its weights strictly from a file; nothing is downloaded.

    Args:
        model_name: an open_clip model name such as "ViT-L-14", or the stem of the JSON config.
        weights_path: an open_clip state dict (.bin, .pt, .pth or .safetensors), also accepted
            wrapped as {"state_dict": sd} or with a DDP "module." prefix.
        model_config_path: an open_clip model config JSON for architectures that open_clip
            does not ship; it is registered with open_clip.add_model_config.
        pretrained: the open_clip pretrained tag the weights come from (for example
            "datacomp_xl_s13b_b90k"). It selects the image mean, std and resizing, which are
            part of the teacher fingerprint. See pretrained_preprocess_cfg for the default.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a folder, a file of another format, a pickle that needs code execution,
            an unknown model name or pretrained tag, or weights that do not fit the architecture.
    """
    if model_config_path is not None:
        _register_model_config(model_name, Path(model_config_path))
    model_config = open_clip.get_model_config(model_name)
    if model_config is None:
        raise ValueError(
            f"unknown open_clip model {model_name!r}; pass model_config_path with its JSON config "
            "or use a name from open_clip.list_models()"
        )

    weights = Path(weights_path)
    state_dict = _load_clip_state_dict(weights)
    with _quiet_random_init_warning():
        model = open_clip.create_model(
            model_name,
            pretrained=None,
            device="cpu",
            force_preprocess_cfg=pretrained_preprocess_cfg(model_name, pretrained),
        )
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{weights} does not fit open_clip model {model_name}: {e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights} does not fit open_clip model {model_name}: "
            f"{describe_key_mismatch(result.missing_keys, result.unexpected_keys)}"
        )

    tokenizer = open_clip.get_tokenizer(model_name)
    return ClipTeacher(model, model_name, tokenizer, embed_dim=int(model_config["embed_dim"]))


def write_random_clip(
    model_config_path: str | os.PathLike, weights_path: str | os.PathLike, seed: int = 0
) -> str:
    """Write TINY_CLIP_CONFIG as JSON and a deterministic random open_clip state dict.

    The same seed writes the same values. The global torch RNG state is left unchanged.

    Returns:
        The model name to load the pair with: the stem of `model_config_path`.
    """
    config_path = Path(model_config_path)
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2) + "\n", encoding="utf-8")
    model_name = config_path.stem
    _register_model_config(model_name, config_path)

    with torch.random.fork_rng(devices=[]), _quiet_random_init_warning():
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name, pretrained=None, device="cpu")
    state_dict = {key: value.detach().clone() for key, value in model.state_dict().items()}
    torch.save(state_dict, os.fspath(weights_path))
    return model_name


def clip_input(image: np.ndarray, teacher: ClipTeacher) -> torch.Tensor:
    """Apply the teacher's evaluation transform to an (H, W, 3) uint8 image, giving (3, S, S)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"expected an (H, W, 3) RGB array, got {shape}; decode with decode_image")
    return teacher.preprocess(Image.fromarray(image.astype(np.uint8, copy=False)))
