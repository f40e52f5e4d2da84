"""The CLIP head of SAM-CLIP: transformer blocks on the backbone's tokens, pooling, LN and an MLP.

Each block starts as a copy of the backbone's last block, which in every SAM variant has global
attention with relative positions. SAM-CLIP (Wang et al., arXiv 2310.15308) reports that this
trains faster than random blocks, and that max pooling beats mean pooling for zero-shot
classification and segmentation.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from segment_anything.modeling.image_encoder import Block
from torch import nn

Pooling = Literal["max", "mean"]


class ClipHead(nn.Module):
    """Map backbone tokens (B, h, w, C) to embeddings in the CLIP teacher's space (B, D)."""

    def __init__(
        self,
        last_block: Block,
        embed_dim: int,
        depth: int = 3,
        pooling: Pooling = "max",
        mlp_hidden_layers: int = 2,
    ) -> None:
        """Build the head from the backbone's last block.

        Args:
            last_block: the backbone's last block; each head block starts as a deep copy.
            embed_dim: D, the CLIP teacher's embedding dimension.
            depth: number of transformer blocks.
            pooling: "max" or "mean" over the h * w tokens.
            mlp_hidden_layers: hidden layers of width C (GELU) before the projection to D.
        """
        super().__init__()
        if depth < 1:
            raise ValueError(f"clip head depth must be at least 1, got {depth}")
        if pooling not in ("max", "mean"):
            raise ValueError(f"pooling must be 'max' or 'mean', got {pooling!r}")
        if mlp_hidden_layers < 1:
            raise ValueError(f"mlp_hidden_layers must be at least 1, got {mlp_hidden_layers}")
        width = last_block.norm1.normalized_shape[0]
        self.pooling = pooling
        self.blocks = nn.ModuleList([copy.deepcopy(last_block) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)

        layers: list[nn.Module] = []
        for _ in range(mlp_hidden_layers):
            layers += [nn.Linear(width, width), nn.GELU()]
        layers.append(nn.Linear(width, embed_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def _run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 4:
            raise ValueError(f"expected backbone tokens (B, h, w, C), got {tuple(tokens.shape)}")
        for block in self.blocks:
            tokens = block(tokens)
        return tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embed backbone tokens (B, h, w, C) into pooled CLIP-space embeddings (B, D)."""
        tokens = self._run_blocks(tokens).flatten(1, 2)  # (B, h * w, C)
        pooled = tokens.amax(dim=1) if self.pooling == "max" else tokens.mean(dim=1)  # (B, C)
        return self.mlp(self.norm(pooled))

    def forward_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embed each token without pooling, for zero-shot segmentation.

        (B, h, w, C) tokens become (B, h, w, D) embeddings.
        """
        return self.mlp(self.norm(self._run_blocks(tokens)))
