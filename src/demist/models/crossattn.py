"""Semantic stream, part 2: cross-attention from the backbone's hidden features to the condition tokens.

Each self-attention block of the frozen UNet is wrapped: the pretrained block runs unchanged, then a new MONAI
`CrossAttentionBlock` (queries from the group-normalised features, keys/values from the tokens) adds its output as a
residual. Its output projection starts at zero, so at initialisation the wrapped UNet computes exactly what the
backbone does. The UNet's forward has no way to pass tokens to these blocks (an unconditional UNet refuses
`context`), so they read them from a `TokenSlot` that `DemistNet.forward` fills for the duration of one call.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from monai.networks.blocks import CrossAttentionBlock
from torch import nn

from demist.models.backbone import attention_block_names


class TokenSlot:
    """The tokens of the forward pass in progress, per thread (replicas running in parallel threads do not mix)."""

    def __init__(self) -> None:
        self._local = threading.local()

    @contextlib.contextmanager
    def holding(self, tokens: torch.Tensor | None) -> Iterator[None]:
        previous = getattr(self._local, "tokens", None)
        self._local.tokens = tokens
        try:
            yield
        finally:
            self._local.tokens = previous

    def get(self) -> torch.Tensor:
        tokens = getattr(self._local, "tokens", None)
        if tokens is None:
            raise RuntimeError("cross-attention block called without tokens: call DemistNet.forward, "
                               "not its backbone directly")
        return tokens

    # thread-local storage cannot be copied or pickled; a copy (deepcopy for an EMA, pickling) starts empty
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()


class CrossAttentionWrapper(nn.Module):
    """A pretrained self-attention block followed by a new, zero-initialised, residual cross-attention to tokens."""

    def __init__(self, block: nn.Module, token_dim: int, slot: TokenSlot) -> None:
        super().__init__()
        channels = block.norm.num_channels
        self.block = block  # the pretrained SpatialAttentionBlock, untouched
        self.cross_norm = nn.GroupNorm(block.norm.num_groups, channels, eps=block.norm.eps, affine=True)
        self.cross_attention = CrossAttentionBlock(
            hidden_size=channels,
            num_heads=block.attn.num_heads,
            context_input_size=token_dim,
            use_flash_attention=block.attn.use_flash_attention,
        )
        nn.init.zeros_(self.cross_attention.out_proj.weight)
        nn.init.zeros_(self.cross_attention.out_proj.bias)
        self.slot = slot  # a plain attribute: shared by all wrappers of one network, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.block(x).contiguous()  # MONAI returns channels-last; CPU GroupNorm backward crashes on it
        shape = hidden.shape
        queries = self.cross_norm(hidden).reshape(*shape[:2], -1).transpose(1, 2)  # (B, voxels, C)
        attended = self.cross_attention(queries, context=self.slot.get())
        return hidden + attended.transpose(1, 2).reshape(shape).to(hidden.dtype)

    def new_modules(self) -> list[nn.Module]:
        """The modules this wrapper adds (the trainable part)."""
        return [self.cross_norm, self.cross_attention]


def add_cross_attention(unet: nn.Module, token_dim: int, slot: TokenSlot) -> list[str]:
    """Wrap every self-attention block of `unet` in place; returns the names of the wrapped blocks."""
    names = attention_block_names(unet)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        setattr(parent, child, CrossAttentionWrapper(getattr(parent, child), token_dim, slot))
    return names


def cross_attention_wrappers(module: nn.Module) -> list[CrossAttentionWrapper]:
    """All cross-attention wrappers inside `module`."""
    return [m for m in module.modules() if isinstance(m, CrossAttentionWrapper)]
