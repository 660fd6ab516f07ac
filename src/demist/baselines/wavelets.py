"""The single-level orthonormal 3D Haar wavelet transform used by cWDM, on batched torch tensors (via `ptwt`).

`dwt3` turns (B, C, D, H, W) into (B, 8·C, D/2, H/2, W/2): for every input channel its 8 sub-bands, low-pass first
(`SUBBANDS` order), so channel `c·8 + k` is sub-band `k` of input channel `c`. `idwt3` is its exact inverse.
Orthonormal: the sum of squares is preserved, and the low-pass band of a constant image is that constant × 2√2.
Both run in float32 (float64 inputs stay float64) with autocast switched off, so bf16 training never quantises
the transform itself.
"""

from __future__ import annotations

import torch

#: Sub-band names as `ptwt` keys them (one letter per axis D, H, W: a = low-pass, d = high-pass), low-pass first.
SUBBANDS = ("aaa", "aad", "ada", "add", "daa", "dad", "dda", "ddd")
WAVELET = "haar"


def _precise(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def dwt3(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) with even D, H, W → (B, 8·C, D/2, H/2, W/2), sub-bands of each channel together."""
    import ptwt

    if x.ndim != 5 or any(s % 2 for s in x.shape[2:]):
        raise ValueError(f"dwt3 expects (B, C, D, H, W) with even spatial sizes; got shape {tuple(x.shape)}")
    with torch.autocast(x.device.type, enabled=False):
        low, details = ptwt.wavedec3(_precise(x), WAVELET, level=1, mode="zero")
        bands = torch.stack([low, *(details[name] for name in SUBBANDS[1:])], dim=2)  # (B, C, 8, d, h, w)
    return bands.flatten(1, 2)


def idwt3(bands: torch.Tensor) -> torch.Tensor:
    """The inverse of `dwt3`: (B, 8·C, d, h, w) → (B, C, 2d, 2h, 2w)."""
    import ptwt

    if bands.ndim != 5 or bands.shape[1] % len(SUBBANDS):
        raise ValueError(f"idwt3 expects (B, 8·C, d, h, w); got shape {tuple(bands.shape)}")
    b, c8, *spatial = bands.shape
    grouped = _precise(bands).reshape(b, c8 // len(SUBBANDS), len(SUBBANDS), *spatial)
    with torch.autocast(bands.device.type, enabled=False):
        details = {name: grouped[:, :, k] for k, name in enumerate(SUBBANDS) if k > 0}
        return ptwt.waverec3((grouped[:, :, 0], details), WAVELET)
