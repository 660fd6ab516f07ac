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

from demist.models.autoencoder import aligned_overlap

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

