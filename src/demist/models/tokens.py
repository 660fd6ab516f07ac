"""Semantic stream, part 1: the condition latent z_c as a short sequence of tokens for cross-attention."""

from __future__ import annotations

import warnings

import torch
from monai.networks.blocks import Convolution
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from torch import nn

from demist.errors import DemistError


def sincos_position_encoding_3d(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Fixed 3D sin-cos position encoding of a token grid, shape (N, dim) in row-major (x, y, z) token order.

    MONAI's encoding needs a multiple of 6 channels (sin and cos per axis); the remaining `dim % 6` channels are
    left at zero.
    """
    usable = dim - dim % 6
    if usable == 0:
        raise DemistError(f"config key demist.token_dim: got {dim}; expected at least 6 (a 3D sin-cos encoding)")
    with warnings.catch_warnings():  # MONAI calls torch.meshgrid without `indexing` ("ij" is what it means)
        warnings.simplefilter("ignore", UserWarning)
        encoding = build_sincos_position_embedding(list(grid), usable, spatial_dims=3).data[0]
    return torch.nn.functional.pad(encoding, (0, dim - usable))


class TokenEncoder(nn.Module):
    """z_c (B, C, X, Y, Z) → tokens (B, N, d): 1×1×1 conv, average pooling to a fixed grid, + 3D position encoding.

    Pooling runs before the 1×1×1 conv: both are linear, so the result is the same as conv-then-pool, at a cost
    that does not grow with the latent's size.
    """

    def __init__(self, in_channels: int, token_dim: int, grid: tuple[int, int, int]) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.pool = nn.AdaptiveAvgPool3d(self.grid)
        self.project = Convolution(spatial_dims=3, in_channels=in_channels, out_channels=token_dim,
                                   kernel_size=1, conv_only=True)
        self.register_buffer("position", sincos_position_encoding_3d(self.grid, token_dim), persistent=False)

    def forward(self, z_c: torch.Tensor) -> torch.Tensor:
        tokens = self.project(self.pool(z_c))  # (B, d, gx, gy, gz)
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, N, d), row-major like the encoding
        return tokens + self.position.to(tokens.dtype)
