"""Spatial stream: a trainable copy of the backbone's encoder (MONAI `ControlNet`) fed z_c through an input gate.

The copy starts from the backbone's weights. z_c enters through a 1×1×1 conv (replacing MONAI's image-resolution
`controlnet_cond_embedding`), and the copy's outputs leave through MONAI's zero-initialised 1×1×1 convs, to be added
to the frozen UNet's skip connections and middle block, so at initialisation the ControlNet adds nothing whatever
the input gate holds. The paper zero-initialises the input gate too (`gate_init="zero"`); then no gradient reaches
the copy's body until the output gates have grown, and `gate_init="default"` starts the gate at PyTorch's default.

Optionally (`demist.controlnet_hint = "latent+image"`) the hint also carries T1w + FLAIR at image resolution through
MONAI's `ControlNetConditioningEmbedding` (`build_image_hint`), computed by the caller and added after the gate. With
`"latent+subpixel"` the same images are first rearranged into channels at latent resolution (MONAI's pixel unshuffle)
and embedded there (`SubpixelConditioningEmbedding`).

Optionally (`demist.controlnet_output_head = true`) a 1×1×1 conv carries the copy's last full-resolution output
(already through its zero gate, so it adds nothing at initialisation) straight to the network's output
(`OutputHead`), a path that does not pass through the frozen decoder's norms and nonlinearities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.utils import pixelunshuffle
from monai.networks.nets import ControlNet, DiffusionModelUNet
from monai.networks.nets.controlnet import ControlNetConditioningEmbedding
from torch import nn

from demist.config_sections import UNetConfig
from demist.models.autoencoder import COND_CHANNELS
from demist.models.backbone import unet_kwargs

_CONTROLNET_ONLY = "controlnet_"  # MONAI's prefix for the ControlNet's own modules (gates, embedding)
_DECODER_ONLY = ("up_blocks.", "out.")  # parts of the UNet the ControlNet does not have


class LatentGate(Convolution):
    """The 1×1×1 input gate on z_c. Its input is z_c, or z_c with an already embedded image hint stacked behind it
    along the channels (MONAI's ControlNet hands its `controlnet_cond` to this module unchanged); the hint is added
    after the gate."""

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        latent = self.conv.in_channels
        gated = super().forward(cond[:, :latent])
        return gated if cond.shape[1] == latent else gated + cond[:, latent:]


def build_gated_controlnet(backbone: DiffusionModelUNet, unet_cfg: UNetConfig, latent_channels: int,
                           use_flash_attention: bool = False, gate_init: str = "zero") -> ControlNet:
    """A ControlNet with the backbone's encoder weights and a 1×1×1 input gate for a latent condition.

    Call it before LoRA or cross-attention change the backbone's module names.
    """
    kwargs = unet_kwargs(unet_cfg, latent_channels, use_flash_attention)
    del kwargs["out_channels"]
    first = unet_cfg.channels[0]
    controlnet = ControlNet(**kwargs, conditioning_embedding_in_channels=latent_channels,
                            conditioning_embedding_num_channels=(first,))
    gate = LatentGate(spatial_dims=3, in_channels=latent_channels, out_channels=first, kernel_size=1, conv_only=True)
    if gate_init == "zero":
        gate.conv.weight.data.zero_()
        gate.conv.bias.data.zero_()
    controlnet.controlnet_cond_embedding = gate

    result = controlnet.load_state_dict(backbone.state_dict(), strict=False)
    wrong_missing = [k for k in result.missing_keys if not k.startswith(_CONTROLNET_ONLY)]
    wrong_unexpected = [k for k in result.unexpected_keys if not k.startswith(_DECODER_ONLY)]
    if wrong_missing or wrong_unexpected:  # strict=False must not hide an architecture mismatch
        raise RuntimeError(f"ControlNet copy does not match the backbone: missing {wrong_missing[:5]}, "
                           f"unexpected {wrong_unexpected[:5]}")
    return controlnet


class SubpixelConditioningEmbedding(ControlNetConditioningEmbedding):
    """T1w + FLAIR → each f³ block of image voxels as f³·2 channels of one latent voxel (lossless), then MONAI's
    conditioning embedding at latent resolution: the image's full detail at the cost of a latent-resolution conv."""

    def __init__(self, out_channels: int, width: int, factor: int) -> None:
        super().__init__(spatial_dims=3, in_channels=COND_CHANNELS * factor ** 3, out_channels=out_channels,
                         channels=(width,))
        self.factor = factor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return super().forward(pixelunshuffle(image, spatial_dims=3, scale_factor=self.factor))


def build_image_hint(out_channels: int, channels: tuple[int, ...], gate_init: str = "zero",
                     kind: str = "latent+image") -> nn.Module:
    """T1w + FLAIR → `out_channels` features at 1 / 2^(len(channels) − 1) of the image's resolution: MONAI's
    ControlNet conditioning embedding, strided (`kind="latent+image"`, 2× per entry of `channels` after the first) or
    after a pixel unshuffle (`"latent+subpixel"`, width `channels[-1]`). MONAI zero-initialises its output conv;
    `gate_init="default"` re-initialises it."""
    if kind == "latent+subpixel":
        embedding = SubpixelConditioningEmbedding(out_channels, channels[-1], 2 ** (len(channels) - 1))
    else:
        embedding = ControlNetConditioningEmbedding(spatial_dims=3, in_channels=COND_CHANNELS,
                                                    out_channels=out_channels, channels=tuple(channels))
    if gate_init == "default":
        embedding.conv_out.conv.reset_parameters()
    return embedding


def zero_initialised_modules(controlnet: ControlNet, gate_init: str) -> list[nn.Module]:
    """The ControlNet's modules that start at zero: its output gates, and its input gate when `gate_init="zero"`."""
    modules: list[nn.Module] = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    return modules + ([controlnet.controlnet_cond_embedding] if gate_init == "zero" else [])


class OutputHead(nn.Module):
    """ControlNet residuals → an addition to the network's prediction, from the last residual at x_t's resolution.

    That residual has passed the copy's last full-resolution resnet (so it depends on t) and its zero-initialised
    output gate (so the head adds nothing at initialisation, whatever its own default-initialised weights hold)."""

    def __init__(self, channels: int, latent_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, latent_channels, kernel_size=1, bias=False)  # no bias: zero in, zero out

    def forward(self, residuals: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        full = [r for r in residuals if tuple(r.shape[2:]) == tuple(size)]
        return self.conv(full[-1])
