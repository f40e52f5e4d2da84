"""SAM variants built from segment_anything's modules, and strict loading of SAM checkpoints.

segment_anything's own `build_sam_*` functions call `torch.load` without `map_location` or
`weights_only`, so checkpoints are loaded here instead and the builders are used only for
their architecture numbers, repeated in `SAM_VARIANTS`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
from functools import partial
from pathlib import Path
from typing import BinaryIO

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from samclip.model.images import SAM_PIXEL_MEAN, SAM_PIXEL_STD

logger = logging.getLogger(__name__)

_PATCH_WEIGHT_KEY = "image_encoder.patch_embed.proj.weight"
_SNIFF_BYTES = 16  # bytes read from a file's start to recognise its format
# Key prefix of a Hugging Face transformers SamModel state dict (pytorch_model.bin).
_HF_SAM_PREFIX = "vision_encoder."
_BLOCK_KEY = re.compile(r"^image_encoder\.blocks\.(\d+)\.")
# how torch 2.x names the class that weights-only unpickling rejected
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


@dataclasses.dataclass(frozen=True)
class SamArch:
    """Architecture numbers of one SAM variant."""

    image_size: int  # pixels of the square, padded encoder input
    patch_size: int  # pixels per patch; the image embedding is image_size / patch_size square
    encoder_embed_dim: int  # ViT token width
    encoder_depth: int  # number of ViT blocks
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]  # blocks with global attention, the rest windowed
    window_size: int  # tokens per side of an attention window
    prompt_embed_dim: int  # channels of the neck output, prompt tokens and mask decoder
    decoder_depth: int  # TwoWayTransformer layers
    decoder_mlp_dim: int
    decoder_num_heads: int
    iou_head_hidden_dim: int
    mask_in_chans: int  # hidden channels of the prompt encoder's mask downscaling

    @property
    def embedding_size(self) -> int:
        """Tokens per side of the image embedding."""
        return self.image_size // self.patch_size


def _official(embed_dim: int, depth: int, heads: int, global_indexes: tuple[int, ...]) -> SamArch:
    # Numbers from segment_anything 1.0 build_sam.py, shared by vit_b, vit_l and vit_h.
    return SamArch(
        image_size=1024,
        patch_size=16,
        encoder_embed_dim=embed_dim,
        encoder_depth=depth,
        encoder_num_heads=heads,
        encoder_global_attn_indexes=global_indexes,
        window_size=14,
        prompt_embed_dim=256,
        decoder_depth=2,
        decoder_mlp_dim=2048,
        decoder_num_heads=8,
        iou_head_hidden_dim=256,
        mask_in_chans=16,
    )


SAM_VARIANTS: dict[str, SamArch] = {
    "vit_b": _official(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": _official(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": _official(1280, 32, 16, (7, 15, 23, 31)),
    # A small SAM for CPU smoke runs and tests: 256 px input, 16x16 image embedding.
    "tiny": SamArch(
        image_size=256,
        patch_size=16,
        encoder_embed_dim=192,
        encoder_depth=4,
        encoder_num_heads=3,
        encoder_global_attn_indexes=(1, 3),
        window_size=8,
        prompt_embed_dim=128,
        decoder_depth=2,
        decoder_mlp_dim=512,
        decoder_num_heads=4,
        iou_head_hidden_dim=128,
        mask_in_chans=16,
    ),
}


def get_sam_arch(variant: str) -> SamArch:
    """Return the architecture of a registered SAM variant."""
    if variant not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; expected one of {sorted(SAM_VARIANTS)}")
    return SAM_VARIANTS[variant]


def build_sam(variant: str) -> Sam:
    """Build a randomly initialised SAM of a registered variant, in eval mode."""
    arch = get_sam_arch(variant)
    grid = arch.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.encoder_global_attn_indexes,
            window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )
    return sam.eval()


def detect_sam_variant(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Name the registered variant whose encoder width and depth match a SAM state dict.

    Returns None when the patch embedding is missing. Returns a description such as
    "unknown (embed dim 512, depth 8)" when no registered variant matches.
    """
    weight = state_dict.get(_PATCH_WEIGHT_KEY)
    if weight is None:
        return None
    embed_dim = int(weight.shape[0])
    block_ids = [int(m.group(1)) for key in state_dict if (m := _BLOCK_KEY.match(key))]
    depth = max(block_ids) + 1 if block_ids else 0
    for name, arch in SAM_VARIANTS.items():
        if (arch.encoder_embed_dim, arch.encoder_depth) == (embed_dim, depth):
            return name
    return f"unknown (embed dim {embed_dim}, depth {depth})"


def _is_safetensors(head: bytes) -> bool:
    """Tell whether the first bytes of a file are a safetensors header.

    A safetensors file starts with the header's length as a little-endian uint64, followed by
    the JSON header itself. A torch.save file starts with a zip or pickle signature instead.
    """
    if len(head) < 9:
        return False
    header_length = int.from_bytes(head[:8], "little")
    return 0 < header_length < 100_000_000 and head[8:9] == b"{"


def _source_name(source: str | os.PathLike | BinaryIO) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", "<stream>"))


def load_weights_file(source: str | os.PathLike | BinaryIO) -> object:
    """Load a torch-saved file on the CPU without executing code from it.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the path is a folder or a safetensors file, the file is truncated or
            corrupt, or its pickle needs more than tensors and plain containers.
    """
    name = _source_name(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise ValueError(f"{name} is a folder; expected a checkpoint file inside it")
        if not path.exists():
            raise FileNotFoundError(f"checkpoint file not found: {name}")
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
        if _is_safetensors(head):
            raise ValueError(
                f"{name} is a safetensors file; expected a torch.save file (a zip archive or a "
                "legacy pickle). Load it with safetensors.torch.load_file, or re-save its state "
                "dict with torch.save"
            )

    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            found = _UNSUPPORTED_GLOBAL.search(str(e))
            needs = f" ({found.group(1)})" if found else ""
            raise ValueError(
                f"{name} was rejected because loading it needs code execution: its pickle "
                f"contains objects other than tensors and plain containers{needs}. Load it in a "
                "trusted session and re-save its state dict with "
                "torch.save(model.state_dict(), path)"
            ) from e
        raise ValueError(
            f"{name} is not a valid torch checkpoint (corrupt or truncated): {e}"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{name} could not be read; the file is truncated or corrupt: {e}") from e


def unwrap_state_dict(
    checkpoint: object, name: str, expected_prefix: str
) -> dict[str, torch.Tensor]:
    """Return the state dict inside `{"model": ...}` / `{"state_dict": ...}`, without `module.`.

    `expected_prefix` is the start of one key the real state dict has (for example
    "image_encoder."), so that a state dict whose own parameter is named "model" is kept whole.
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"{name} contains a {type(checkpoint).__name__}, expected a state dict (a dict of "
            "parameter name to tensor)"
        )
    state_dict: dict = checkpoint
    for wrapper in ("model", "state_dict"):
        inner = state_dict.get(wrapper)
        has_expected = any(str(key).startswith(expected_prefix) for key in state_dict)
        if isinstance(inner, dict) and not has_expected:
            logger.info("%s: using the state dict stored under the %r key", name, wrapper)
            state_dict = inner

    if state_dict and all(str(key).startswith("module.") for key in state_dict):
        logger.info("%s: removing the DDP 'module.' prefix from %d keys", name, len(state_dict))
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}

    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{name}: {len(not_tensors)} entries are not tensors (first: {not_tensors[:5]}); "
            "expected a plain state dict"
        )
    return state_dict


def describe_key_mismatch(missing: list[str], unexpected: list[str]) -> str:
    """Describe missing and unexpected state-dict keys with counts and the first 5 names."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first: {missing[:5]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:5]})")
    return " and ".join(parts)


def load_sam_checkpoint(source: str | os.PathLike | BinaryIO, variant: str) -> Sam:
    """Load a SAM checkpoint in the official layout into a SAM of `variant`, in eval mode.

    Accepted: a plain state dict with keys image_encoder.*, prompt_encoder.* and mask_decoder.*,
    also wrapped as {"model": sd} or {"state_dict": sd}, or with a DDP "module." prefix.
    Loading is strict and never executes code from the file.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a folder, a safetensors file, a truncated or corrupt file, a pickle that
            needs code execution, a Hugging Face transformers state dict, a checkpoint of
            another variant, or missing, unexpected or mis-shaped keys.
    """
    arch = get_sam_arch(variant)
    name = _source_name(source)
    state_dict = unwrap_state_dict(load_weights_file(source), name, "image_encoder.")
    if any(key.startswith(_HF_SAM_PREFIX) for key in state_dict):
        raise ValueError(
            f"{name} is a Hugging Face transformers SamModel state dict (keys vision_encoder.*); "
            "expected the official segment_anything layout (image_encoder.*, prompt_encoder.*, "
            "mask_decoder.*), as in the released sam_vit_b_01ec64.pth"
        )

    detected = detect_sam_variant(state_dict)
    if detected is not None and detected != variant:
        raise ValueError(
            f"{name} looks like SAM variant {detected}, but variant {variant!r} was requested "
            f"(embed dim {arch.encoder_embed_dim}, depth {arch.encoder_depth}); request "
            f"variant {detected!r} or use a {variant} checkpoint"
        )

    sam = build_sam(variant)
    try:
        result = sam.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{name} does not fit SAM {variant}: {e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{name} does not fit SAM {variant}: "
            f"{describe_key_mismatch(result.missing_keys, result.unexpected_keys)}; expected the "
            "official SAM layout (image_encoder.*, prompt_encoder.*, mask_decoder.*)"
        )
    return sam.eval()


def save_sam_checkpoint(sam: Sam, path: str | os.PathLike) -> None:
    """Save SAM's weights as a plain state dict in the official layout.

    Keys are image_encoder.*, prompt_encoder.* and mask_decoder.*, like the released
    checkpoints. The pixel mean and std buffers are not persistent, so they are not saved.
    """
    state_dict = {key: value.detach().cpu().clone() for key, value in sam.state_dict().items()}
    torch.save(state_dict, os.fspath(path))


def write_random_sam(path: str | os.PathLike, variant: str = "tiny", seed: int = 0) -> None:
    """Write a SAM checkpoint with random weights; a given seed always writes the same values.

    SAM's builder initialises the absolute position embedding and the relative position tables
    to zero. They get small random values here, so that a random teacher also exercises the
    position terms. The global torch RNG state is left unchanged.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam(variant)
        with torch.no_grad():
            for name, parameter in sam.image_encoder.named_parameters():
                if name == "pos_embed" or name.endswith(("rel_pos_h", "rel_pos_w")):
                    torch.nn.init.trunc_normal_(parameter, std=0.02)
    save_sam_checkpoint(sam, path)
