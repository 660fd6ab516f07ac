"""The two Stage-1 autoencoders: MONAI `AutoencoderKL` for PSR (1 channel) and for the condition (T1w + FLAIR).

Both share one architecture (config section [autoencoder]): 3 levels (4× downsampling), no attention anywhere, as
the MONAI model-zoo `brats_mri_generative_diffusion` autoencoder. That bundle's weights, in the old monai-generative
key layout, can initialise either autoencoder; the 2-channel condition autoencoder receives them as described in
`adapt_channels`.

Two settings matter for quantitative maps. GroupNorm divides each feature group by its standard deviation over the field
of view, which discards the intensity scale that a PSR map is made of; a `norm_eps` of the order of the features'
variance (the `tiny` preset: 1.0; the bundle: 1e-6) keeps most of it and trains several dB better in a short budget. And
since GroupNorm's statistics still depend on the field of view, whole volumes are encoded and decoded in windows of the
training patch size (`encode_volume`, `decode_volume`, window = `[autoencoder] patch_size`). `[autoencoder] norm =
"channel"` (docs/configs/tiny-2x-hint.toml; both presets keep GroupNorm) normalises each voxel over its channels
instead: the output no longer depends on the window, which then only bounds memory (docs/autoencoder.md).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.networks.nets import AutoencoderKL
from monai.networks.nets.autoencoderkl import AEKLDownsample

from demist.config_sections import AutoencoderConfig
from demist.errors import DemistError
from demist.models.checkpoint_files import read_state_dict as read_state_dict_file

logger = logging.getLogger(__name__)

PSR_CHANNELS = 1
COND_CHANNELS = 2  # T1w, FLAIR
INPUT_CONV = "encoder.blocks.0.conv"  # the first convolution of the encoder (image -> features)


def autoencoder_kwargs(cfg: AutoencoderConfig, channels: int) -> dict[str, Any]:
    """Constructor arguments of an AutoencoderKL with `channels` input and output channels."""
    levels = len(cfg.channels)
    return dict(
        spatial_dims=3,
        in_channels=channels,
        out_channels=channels,
        channels=tuple(cfg.channels),
        latent_channels=cfg.latent_channels,
        num_res_blocks=cfg.num_res_blocks,
        norm_num_groups=cfg.norm_num_groups,
        norm_eps=cfg.norm_eps,
        attention_levels=(False,) * levels,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
        include_fc=False,
    )


def build_autoencoder(cfg: AutoencoderConfig, channels: int) -> AutoencoderKL:
    """A randomly initialised autoencoder (1 channel for PSR, 2 for T1w + FLAIR)."""
    try:
        model = AutoencoderKL(**autoencoder_kwargs(cfg, channels))
    except ValueError as exc:  # MONAI's constructor checks (channels vs groups, list lengths)
        raise DemistError(f"config [autoencoder]: {exc}; expected a valid MONAI AutoencoderKL architecture") from None
    if cfg.norm == "channel":
        use_channel_norm(model)
    return model


class ChannelNorm(torch.nn.Module):
    """Each voxel normalised over its channels (a LayerNorm over channels, as in ConvNeXt), with GroupNorm's
    parameter names. No statistic spans space, so a voxel's output depends on its receptive field only, not on the
    window or volume it is computed in. MONAI's AutoencoderKL builds GroupNorm only, hence this small module."""

    def __init__(self, num_channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = torch.nn.functional.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps)
        return normed.movedim(-1, 1)


def use_channel_norm(model: torch.nn.Module) -> None:
    """Replace every GroupNorm of `model` by a `ChannelNorm` of the same channels and epsilon (state-dict keys kept)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.GroupNorm):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, ChannelNorm(module.num_channels, module.eps))


def downsampling_factor(cfg: AutoencoderConfig) -> int:
    """Image voxels per latent voxel along each axis (2 per level after the first)."""
    return 2 ** (len(cfg.channels) - 1)


def autoencoder_from_state(cfg: AutoencoderConfig, state: Mapping[str, torch.Tensor]) -> AutoencoderKL:
    """Build the configured autoencoder with as many channels as `state` has, and load `state` (strict)."""
    channels = int(state[f"{INPUT_CONV}.weight"].shape[1])
    model = build_autoencoder(cfg, channels)
    model.load_state_dict(dict(state), strict=True)
    return model


# --- the MONAI bundle autoencoder -------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors from a `.pt`/`.pth` (torch.save, tensors only) or `.safetensors` file."""
    return read_state_dict_file(path, "autoencoder weights", wrappers=("state_dict", "model", "autoencoder"))


def old_key(new_key: str) -> str:
    """The monai-generative name of an autoencoder key (without attention, MONAI only renamed `postconv`)."""
    return new_key.replace(".postconv.", ".conv.")


def adapt_channels(state: Mapping[str, torch.Tensor], model: AutoencoderKL) -> dict[str, torch.Tensor]:
    """Fit a 1-channel state dict to a model with more image channels (the condition autoencoder).

    Encoder input: every input channel gets the pretrained kernel divided by the number of channels, so an input
    whose channels are all equal (T1w = FLAIR) produces exactly the pretrained activations. Decoder output: every
    output channel gets the pretrained kernel and bias, so each channel starts as the pretrained reconstruction.
    """
    adapted = dict(state)
    expected = model.state_dict()
    for key, value in state.items():
        target = expected.get(key)
        if target is None or target.shape == value.shape or value.ndim == 0:
            continue
        if key == f"{INPUT_CONV}.weight" and value.shape[1] == 1:
            adapted[key] = value.repeat(1, target.shape[1], *([1] * (value.ndim - 2))) / target.shape[1]
        elif value.shape[0] == 1 and target.shape[1:] == value.shape[1:]:  # the decoder's output conv
            adapted[key] = value.repeat(target.shape[0], *([1] * (value.ndim - 1)))
    return adapted


def load_bundle_autoencoder(model: AutoencoderKL, path: str | Path) -> None:
    """Initialise `model` from a MONAI bundle autoencoder file (old monai-generative or new key layout).

    The architecture must be the configured one (the `paper` preset is the bundle's); a mismatch is named key by key.
    """
    state = read_state_dict(path)
    expected = model.state_dict()
    old_expected = {old_key(k): v for k, v in expected.items()}
    layout = "new" if len(set(state) ^ set(expected)) <= len(set(state) ^ set(old_expected)) else "old"
    reference = expected if layout == "new" else old_expected
    state = adapt_channels(state, model) if layout == "new" else _adapt_old(state, model)
    missing, unexpected = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or unexpected:
        raise DemistError(f"{path}: {len(missing)} missing key(s) {missing[:3]} and {len(unexpected)} unexpected "
                          f"key(s) {unexpected[:3]} for the {layout} key layout; expected an AutoencoderKL of the "
                          "configured [autoencoder] architecture")
    for key, value in reference.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise DemistError(f"{path}: key {key} has shape {tuple(state[key].shape)}; expected {tuple(value.shape)} "
                              "for the configured [autoencoder] architecture")
    if layout == "new":
        model.load_state_dict(state, strict=True)
    else:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            model.load_old_state_dict(dict(state))  # MONAI pops keys from the dict it gets: give it a copy
        if printed.getvalue().strip():
            logger.debug("MONAI load_old_state_dict: %s", printed.getvalue().strip())
    logger.info("initialised a %d-channel autoencoder from %s (%s key layout)",
                model.encoder.blocks[0].conv.in_channels, path, layout)


def _adapt_old(state: Mapping[str, torch.Tensor], model: AutoencoderKL) -> dict[str, torch.Tensor]:
    """`adapt_channels` for a state dict in the old key layout."""
    by_new = {new: old_key(new) for new in model.state_dict()}
    new_layout = {new: state[old] for new, old in by_new.items() if old in state}
    adapted = adapt_channels(new_layout, model)
    out = dict(state)
    out.update({by_new[k]: v for k, v in adapted.items()})
    return out


# --- whole volumes ---------------------------------------------------------------------------------------------
# GroupNorm normalises over the whole field of view, so an autoencoder trained on patches gives other (worse) outputs
# on a whole volume, whose statistics differ (more background). Volumes are therefore encoded and decoded window by
# window, each window the size of the training patches, and the overlapping windows blended (MONAI's sliding window).


def pad_to_multiple(volume: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the spatial axes of (B, C, D, H, W) up to a multiple; returns the padded tensor and the crop back."""
    spatial = volume.shape[2:]
    padded = [int(np.ceil(s / multiple) * multiple) for s in spatial]
    pads: list[int] = []
    for s, p in reversed(list(zip(spatial, padded))):
        pads += [0, p - s]
    crop = (slice(None), slice(None), *(slice(0, s) for s in spatial))
    return torch.nn.functional.pad(volume, pads), crop


def _factor(model: AutoencoderKL) -> int:
    """Image voxels per latent voxel along each axis."""
    return 2 ** sum(isinstance(b, AEKLDownsample) for b in model.encoder.blocks)


def _windows(function, volume: torch.Tensor, window: Sequence[int], overlap: float | list[float]) -> torch.Tensor:
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(volume, tuple(int(w) for w in window), 4, function, overlap=overlap,
                                    mode="gaussian", padding_mode="constant", cval=0.0, progress=False)


def aligned_overlap(tile: Sequence[int], overlap: float, multiple: int) -> list[float]:
    """Per-axis overlaps for MONAI whose stride between tiles is a multiple of `multiple` and whose effective overlap
    (1 − stride / tile) is at least `overlap`.

    MONAI steps int(tile·(1 − overlap)) input voxels from tile to tile. A downsampling network whose tiles start off its
    output grid has each tile's output placed a fraction of an output voxel away from where it belongs (an encoder at
    overlap 1/3 on 32³ windows: 18.7 dB instead of 24.5 on the demo), so the stride is rounded down to a multiple.
    """
    overlaps = []
    for edge in tile:
        stride = max(multiple, int(edge * (1 - overlap)) // multiple * multiple)
        overlaps.append(0.0 if stride >= edge else 1 - (stride + 0.5) / edge)  # +0.5: int() lands on the stride
    return overlaps


def encode_windowed(model: AutoencoderKL, image: torch.Tensor, window: Sequence[int], overlap: float = 0.5
                    ) -> torch.Tensor:
    """μ of (B, C, D, H, W) computed in `window`-sized pieces (the field of view the autoencoder's GroupNorm was
    trained on), each starting on the latent grid; differentiable, for a condition encoder that is fine-tuned."""
    return _windows(lambda x: model.encode(x)[0], image, window, aligned_overlap(window, overlap, _factor(model)))


@torch.no_grad()
def encode_volume(model: AutoencoderKL, image: torch.Tensor, window: Sequence[int], overlap: float = 0.5
                  ) -> torch.Tensor:
    """The latent mean μ of (B, C, D, H, W), sizes multiples of the downsampling factor, window by window."""
    factor = _factor(model)
    if any(s % factor for s in image.shape[2:]) or any(w % factor for w in window):
        raise ValueError(f"image {tuple(image.shape[2:])} and window {tuple(window)} must be multiples of {factor}")
    return encode_windowed(model, image, window, overlap)


@torch.no_grad()
def decode_volume(model: AutoencoderKL, latent: torch.Tensor, window: Sequence[int], overlap: float = 0.5
                  ) -> torch.Tensor:
    """Decode a whole latent volume; `window` is the image-space window (the training patch size)."""
    factor = _factor(model)
    return _windows(model.decode, latent, [w // factor for w in window], overlap)


@torch.no_grad()
def reconstruct(model: AutoencoderKL, image: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """decode(μ(image)) for (B, C, D, H, W) of any size (zero-padded to the downsampling factor internally)."""
    padded, crop = pad_to_multiple(image, _factor(model))
    return decode_volume(model, encode_volume(model, padded, window), window)[crop]
