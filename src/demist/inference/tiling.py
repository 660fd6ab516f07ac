"""Bounded-memory inference on whole volumes: overlapping tiles blended with Gaussian weights.

A thin layer over MONAI's `sliding_window_inference`, which already blends overlapping windows and handles
predictors whose output is larger or smaller than their input (the decoder upsamples 4×, the encoder downsamples).
The weights are normalised, so a tile that covers the whole volume gives exactly the untiled result, and a model
that is pointwise in its input gives the same value wherever tiles overlap.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference

#: Standard deviation of the Gaussian blending window, as a fraction of the tile size.
BLEND_SIGMA = 0.125


def tiled(
    fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    tile: Sequence[int],
    overlap: float,
    progress: bool = False,
    downsample: int = 1,
    **kwargs,
) -> torch.Tensor:
    """Apply `fn` to overlapping tiles of `x` (B, C, D, H, W) and blend the outputs; `kwargs` go to `fn`.

    A tile larger than the volume is cut down to the volume, so small inputs run in one piece. `downsample`: input
    voxels per output voxel of `fn` (an encoder's factor); tiles then start on multiples of it (see `aligned_overlap`).
    """
    size = tuple(min(int(t), int(s)) for t, s in zip(tile, x.shape[2:]))
    if size == tuple(x.shape[2:]):
        return fn(x, **kwargs)
    return sliding_window_inference(
        x,
        roi_size=size,
        sw_batch_size=1,
        predictor=fn,
        overlap=aligned_overlap(size, overlap, downsample) if downsample > 1 else overlap,
        mode="gaussian",
        sigma_scale=BLEND_SIGMA,
        padding_mode="constant",
        progress=progress,
        **kwargs,
    )


def aligned_overlap(tile: Sequence[int], overlap: float, multiple: int) -> list[float]:
    """Per-axis overlaps at least `overlap` whose stride between tiles is a multiple of `multiple`.

    MONAI steps int(tile·(1 − overlap)) input voxels from tile to tile. A downsampling `fn` whose tiles start off its
    output grid has each tile's output placed a fraction of an output voxel away from where it belongs (an encoder at
    overlap 1/3 on 32³ windows: 18.7 dB instead of 24.5 on the demo), so the stride is rounded down to a multiple.
    """
    overlaps = []
    for edge in tile:
        stride = max(multiple, int(edge * (1 - overlap)) // multiple * multiple)
        overlaps.append(0.0 if stride >= edge else 1 - (stride + 0.5) / edge)  # +0.5: int() lands on the stride
    return overlaps
