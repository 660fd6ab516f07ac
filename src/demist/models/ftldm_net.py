"""FT-LDM, the fine-tuned latent diffusion baseline: the pretrained backbone, conditioned by concatenation.

The condition latent z_c is concatenated to the noisy latent x_t at the UNet's input, and the whole UNet is
fine-tuned; there are no ControlNet residuals, no LoRA and no cross-attention tokens. The input convolution is
widened from C to 2C channels with zero weights on the z_c half, so before training the network is exactly the
backbone. This is the conventional way to condition a pretrained LDM, and the baseline DEMIST's decoupled streams
are measured against.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from demist.config_sections import UNetConfig
from demist.models.backbone import unet_kwargs

INPUT_CONV = "conv_in.conv"


class ConcatConditionedUNet(nn.Module):
    """net(x_t, t, z_c) = UNet([x_t, z_c], t): the call signature of `DemistNet`, so the same samplers drive it."""

    def __init__(self, unet_cfg: UNetConfig, latent_channels: int, use_flash_attention: bool = False) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        kwargs = unet_kwargs(unet_cfg, latent_channels, use_flash_attention)
        self.unet = DiffusionModelUNet(**{**kwargs, "in_channels": 2 * latent_channels})

    @classmethod
    def from_backbone(cls, backbone: nn.Module, unet_cfg: UNetConfig, latent_channels: int,
                      use_flash_attention: bool = False) -> "ConcatConditionedUNet":
        """Start from the backbone's weights; the input convolution's z_c half is zero (output = backbone's)."""
        net = cls(unet_cfg, latent_channels, use_flash_attention)
        state = dict(backbone.state_dict())
        weight = state[f"{INPUT_CONV}.weight"]
        state[f"{INPUT_CONV}.weight"] = torch.cat([weight, torch.zeros_like(weight)], dim=1)
        net.unet.load_state_dict(state)
        return net

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z_c: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([x_t, z_c.to(x_t.dtype)], dim=1), t)

    def merge_lora(self) -> None:
        """Nothing to merge (no LoRA): the inference path calls this on every conditioned network."""
