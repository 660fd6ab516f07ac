"""How much memory one network call of inference needs, and the tiles and windows a memory budget allows.

The estimates are rough fp32 upper bounds of the live feature maps of one call (the networks' own weights are
counted separately, from their parameters), calibrated on CPU measurements: the `paper` autoencoder's encode and
decode of a 96³ window take 2.1 GiB, one `paper` UNet step without SDPA on a 48×56×48 latent 9.6 GiB
(`benchmarks/inference_speed.py` prints the estimate beside the measured peak of every call).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from torch import nn

from demist.config import Config
from demist.errors import DemistError
from demist.models.autoencoder import downsampling_factor

GIB = 2**30
#: Memory of the interpreter, torch and MONAI before any network is built.
BASE_BYTES = 0.5 * GIB
#: Feature maps of the widest level alive at once during a call, and copies of an attention matrix without SDPA.
AE_LIVE_MAPS, UNET_LIVE_MAPS, ATTENTION_COPIES = 7, 6, 2
#: `--max-memory`'s default (GiB): what a laptop or a small GPU can give one synthesis.
DEFAULT_MAX_MEMORY_GIB = 4.0


def downsampling(cfg: Config) -> int:
    """Image voxels per latent voxel along each axis."""
    return downsampling_factor(cfg.autoencoder)


def call_bytes(cfg: Config, part: str, spatial: Sequence[int], plain_attention: bool = False) -> float:
    """Live memory of one call of `part` ("encode": image → latent; "decode": latent → image; "step": ControlNet +
    UNet on a latent) whose input has the spatial size `spatial`."""
    if part in ("encode", "decode"):
        image_voxels = math.prod(spatial) * (downsampling(cfg) ** 3 if part == "decode" else 1)
        return 4.0 * AE_LIVE_MAPS * cfg.autoencoder.channels[0] * image_voxels
    if part != "step":
        raise ValueError(f"part {part!r}: expected 'encode', 'decode' or 'step'")
    unet = cfg.unet
    voxels = [math.prod(spatial) / 8**level for level in range(len(unet.channels))]
    skips = 2 * sum((unet.num_res_blocks + 1) * c * v for c, v in zip(unet.channels, voxels))  # UNet + ControlNet
    attention = max((ATTENTION_COPIES * (c // h) * v**2 for c, h, v, on in
                     zip(unet.channels, unet.num_head_channels, voxels, unet.attention_levels) if on), default=0.0)
    return 4.0 * (skips + UNET_LIVE_MAPS * unet.channels[0] * voxels[0] + (attention if plain_attention else 0.0))


def resident_bytes(modules: Iterable[nn.Module]) -> float:
    """The interpreter plus the parameters and buffers of `modules`."""
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    return BASE_BYTES + float(sum(t.numel() * t.element_size() for t in tensors))


def unet_tile(cfg: Config, latent: Sequence[int], max_gib: float, resident: float) -> tuple[int, int, int]:
    """The UNet's tile on a `latent`-sized volume: `sampling.tile_size`, its training patch, cut to the volume.

    Never larger: GroupNorm and attention see the whole tile, so a sample of the whole latent at once is another model
    (on the demo's held-out sessions it scored 3 dB lower against the truth than the tiled sample; docs/inference.md).
    Never smaller either, for the same reason: a budget it does not fit is refused, naming what it needs."""
    tile = tuple(min(int(t), int(s)) for t, s in zip(cfg.sampling.tile_size, latent))
    _check_fits(cfg, "step", tile, max_gib, resident)
    return tile


def autoencoder_window(cfg: Config, part: str, spatial: Sequence[int], max_gib: float,
                       resident: float) -> tuple[int, int, int]:
    """The window of an autoencoder call ("encode": image voxels; "decode": latent voxels) on a `spatial`-sized input.

    GroupNorm (`autoencoder.norm = "group"`) makes the output depend on the window, so it is the training patch, cut
    to the input. With the channel norm the window only bounds memory: the whole input when one call on it fits the
    budget (no overlapping windows to compute twice), else the largest halving of it that does."""
    factor = downsampling(cfg)
    trained = tuple(int(p) // (factor if part == "decode" else 1) for p in cfg.autoencoder.patch_size)
    whole = tuple(int(s) for s in spatial)
    if cfg.autoencoder.norm != "channel":
        window = tuple(min(t, s) for t, s in zip(trained, whole))
        _check_fits(cfg, part, window, max_gib, resident)
        return window
    window, multiple = whole, 1 if part == "decode" else factor  # an encoder window must downsample whole
    smallest = tuple(min(t, s) for t, s in zip(trained, whole))
    while resident + call_bytes(cfg, part, window) > max_gib * GIB and window != smallest:
        edge = max(max(smallest), max(window) // 2 // multiple * multiple)
        window = tuple(max(m, min(w, edge)) for w, m in zip(window, smallest))
    _check_fits(cfg, part, window, max_gib, resident)
    return window


def _check_fits(cfg: Config, part: str, tile: Sequence[int], max_gib: float, resident: float) -> None:
    need = (resident + call_bytes(cfg, part, tile)) / GIB
    if need > max_gib:
        what = {"step": "sampling step", "encode": "encoder window", "decode": "decoder window"}[part]
        raise DemistError(f"--max-memory {max_gib:g}: one {'×'.join(map(str, tile))} {what} of this model needs about "
                          f"{need:.1f} GiB; expected a budget of at least that")
