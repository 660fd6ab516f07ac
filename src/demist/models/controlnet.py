"""Spatial stream: a trainable copy of the backbone's encoder (MONAI `ControlNet`) fed z_c through a zero gate.

The copy starts from the backbone's weights. z_c enters through a zero-initialised 1×1×1 conv (replacing MONAI's
image-resolution `controlnet_cond_embedding`), and the copy's outputs leave through MONAI's zero-initialised 1×1×1
convs, to be added to the frozen UNet's skip connections and middle block. Both gates start at zero, so at
initialisation the ControlNet adds nothing.
"""

from __future__ import annotations

from monai.networks.blocks import Convolution
from monai.networks.nets import ControlNet, DiffusionModelUNet

from demist.config import UNetConfig
from demist.models.backbone import unet_kwargs

_CONTROLNET_ONLY = "controlnet_"  # MONAI's prefix for the ControlNet's own modules (gates, embedding)
_DECODER_ONLY = ("up_blocks.", "out.")  # parts of the UNet the ControlNet does not have


def build_gated_controlnet(backbone: DiffusionModelUNet, unet_cfg: UNetConfig, latent_channels: int,
                           use_flash_attention: bool = False) -> ControlNet:
    """A ControlNet with the backbone's encoder weights and a zero 1×1×1 input gate for a latent condition.

    Call it before LoRA or cross-attention change the backbone's module names.
    """
    kwargs = unet_kwargs(unet_cfg, latent_channels, use_flash_attention)
    del kwargs["out_channels"]
    first = unet_cfg.channels[0]
    controlnet = ControlNet(**kwargs, conditioning_embedding_in_channels=latent_channels,
                            conditioning_embedding_num_channels=(first,))
    gate = Convolution(spatial_dims=3, in_channels=latent_channels, out_channels=first, kernel_size=1,
                       conv_only=True)
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
