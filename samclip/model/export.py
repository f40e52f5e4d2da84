"""Export a SamClip student to TorchScript: the image encoder with both heads, and the decoder.

TorchScript is the export format because the ONNX route (torch.onnx.export, which
segment_anything's SamOnnxModel was written for) needs the `onnx` package, which this project
does not install. A TorchScript file runs with torch alone, in Python or in C++ through libtorch.

Two modules are traced, as SAM splits its own export:
- the image encoder: images (B, 3, S, S) to the pooled CLIP embedding, the CLIP patch
  embeddings and SAM's image embeddings, from one backbone pass;
- the prompt decoder: SAM's prompt encoder and mask decoder, from one image embedding and N
  point prompts with an optional low-resolution mask to N low-resolution masks.

NOTE: torch.jit.trace records the Python control flow of one example input. The encoder is
valid for the traced S only (any batch size B), and the decoder for the traced number of point
slots P (any N). torch 2.9 and later mark torch.jit.trace deprecated in favour of torch.export;
it still works in torch 2.14, which this project pins.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch
from torch import nn

from samclip.model.student import SamClip


class TorchScriptExport(NamedTuple):
    """Paths of the two exported TorchScript files."""

    image_encoder: str
    prompt_decoder: str


class ImageEncoderWithHeads(nn.Module):
    """The student's backbone with the image parts of both heads, for export.

    forward maps (B, 3, S, S) SAM-normalised images to a tuple of
    clip_embedding (B, D), clip_patch_embeddings (B, h, w, D) and image_embeddings (B, C', h, w),
    all from one backbone pass.
    """

    def __init__(self, model: SamClip) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.model.backbone_tokens(images)  # (B, h, w, C)
        return (
            self.model.clip_head(tokens),
            self.model.clip_head.forward_patches(tokens),
            self.model.image_embeddings_from_tokens(tokens),
        )


class PromptDecoder(nn.Module):
    """SAM's prompt encoder and mask decoder for N point prompts on one image, for export.

    The inputs follow segment_anything's ONNX model (SamOnnxModel): has_mask_input selects, per
    prompt, the encoded mask_input or the prompt encoder's "no mask" embedding, so one traced
    graph serves prompts with and without a mask.
    """

    def __init__(self, model: SamClip) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one mask per prompt.

        Args:
            image_embeddings: (1, C', h, w) from the image encoder.
            point_coords: (N, P, 2) (x, y) in the SAM input frame.
            point_labels: (N, P) 1 foreground, 0 background, -1 padding.
            mask_input: (N, 1, 4h, 4w) low-resolution mask logits.
            has_mask_input: (N,) 1.0 where mask_input is used, 0.0 where it is ignored.

        Returns:
            mask_logits (N, 1, 4h, 4w) and iou (N, 1).
        """
        sparse, _ = self.prompt_encoder(
            points=(point_coords, point_labels), boxes=None, masks=None
        )  # (N, P + 1, C')
        with_mask = self.prompt_encoder.mask_downscaling(mask_input)  # (N, C', h, w)
        without_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        weight = has_mask_input.reshape(-1, 1, 1, 1).to(with_mask.dtype)
        dense = weight * with_mask + (1.0 - weight) * without_mask
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )


def _trace(module: nn.Module, example: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # The deprecation notice and the "tensor to a Python boolean" warnings from the shape
        # checks are expected; the docstring of this module states what tracing fixes.
        warnings.simplefilter("ignore")
        return torch.jit.trace(module.eval(), example, check_trace=False)


def trace_image_encoder(model: SamClip, image_size: int | None = None) -> torch.jit.ScriptModule:
    """Trace ImageEncoderWithHeads at image_size (default: the student's SAM resolution)."""
    size = image_size or model.arch.sam_resolution
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, size, size, device=device)
    return _trace(ImageEncoderWithHeads(model), (example,))


def trace_prompt_decoder(model: SamClip, num_points: int = 3) -> torch.jit.ScriptModule:
    """Trace PromptDecoder for prompts of `num_points` point slots each."""
    device = next(model.parameters()).device
    grid = model.prompt_encoder.image_embedding_size
    channels = model.prompt_encoder.embed_dim
    example = (
        torch.zeros(1, channels, *grid, device=device),
        torch.zeros(2, num_points, 2, device=device),
        torch.ones(2, num_points, dtype=torch.long, device=device),
        torch.zeros(2, 1, 4 * grid[0], 4 * grid[1], device=device),
        torch.ones(2, device=device),
    )
    return _trace(PromptDecoder(model), example)


def export_torchscript(
    model: SamClip, folder: str | os.PathLike, num_points: int = 3
) -> TorchScriptExport:
    """Trace both modules and save them as image_encoder.pt and prompt_decoder.pt in `folder`.

    The student is put in eval mode. Load the files with torch.jit.load.
    """
    model.eval()
    os.makedirs(folder, exist_ok=True)
    paths = TorchScriptExport(
        image_encoder=os.path.join(folder, "image_encoder.pt"),
        prompt_decoder=os.path.join(folder, "prompt_decoder.pt"),
    )
    torch.jit.save(trace_image_encoder(model), paths.image_encoder)
    torch.jit.save(trace_prompt_decoder(model, num_points), paths.prompt_decoder)
    return paths
