"""The frozen backbone: MONAI's unconditional `DiffusionModelUNet`, built from the config or loaded from a checkpoint.

Checkpoints come in two key layouts. The MONAI model-zoo bundle (`brats_mri_generative_diffusion`) stores its
`diffusion_model` weights in the old monai-generative layout, which MONAI's `load_old_state_dict` maps; checkpoints
written by MONAI >= 1.4 (and by demist's own backbone pretraining) use the new layout. Either is checked key by key
before anything is loaded, so a checkpoint of another architecture never loads half-way.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from demist.config_sections import UNetConfig
from demist.errors import DemistError
from demist.models.checkpoint_files import read_state_dict as read_state_dict_file

logger = logging.getLogger(__name__)

# Self-attention blocks of the UNet, by module name: the places for LoRA and for the new cross-attention.
ATTENTION_BLOCK_NAME = re.compile(
    r"(down_blocks\.\d+\.attentions\.\d+|middle_block\.attention|up_blocks\.\d+\.attentions\.\d+)"
)
# Keys of the old layout that MONAI's mapping leaves unused: the output projection of each self-attention block,
# which `include_fc=False` (the bundle's setting) does not have.
_UNUSED_OLD_KEY = re.compile(rf"{ATTENTION_BLOCK_NAME.pattern}\.proj_attn\.(weight|bias)")
_MAX_KEYS_IN_ERROR = 5


def unet_kwargs(unet_cfg: UNetConfig, latent_channels: int, use_flash_attention: bool = False) -> dict[str, Any]:
    """Constructor arguments of the backbone UNet (also used for the ControlNet copy, minus `out_channels`)."""
    return dict(
        spatial_dims=3,
        in_channels=latent_channels,
        out_channels=latent_channels,
        channels=tuple(unet_cfg.channels),
        attention_levels=tuple(unet_cfg.attention_levels),
        num_head_channels=tuple(unet_cfg.num_head_channels),
        num_res_blocks=unet_cfg.num_res_blocks,
        norm_num_groups=unet_cfg.norm_num_groups,
        include_fc=False,  # required by the bundle weights: with an output projection the outputs differ
        use_combined_linear=False,
        use_flash_attention=use_flash_attention,
    )


def build_unet(unet_cfg: UNetConfig, latent_channels: int = 8, use_flash_attention: bool = False) -> DiffusionModelUNet:
    """A randomly initialised unconditional 3D UNet (in = out = latent channels); SDPA attention if asked."""
    try:
        return DiffusionModelUNet(**unet_kwargs(unet_cfg, latent_channels, use_flash_attention))
    except ValueError as exc:  # MONAI's constructor checks (channels vs groups, list lengths)
        raise DemistError(f"config [unet]: {exc}; expected a valid MONAI DiffusionModelUNet architecture") from None


def freeze(module: nn.Module) -> nn.Module:
    """Switch off gradients for every parameter and put the module in eval mode; returns the module."""
    module.requires_grad_(False)
    return module.eval()


def attention_block_names(unet: nn.Module) -> list[str]:
    """Names of the UNet's self-attention blocks (levels with attention, down, middle and up), in module order."""
    return [name for name, _ in unet.named_modules() if ATTENTION_BLOCK_NAME.fullmatch(name)]


def uses_flash_attention(unet: nn.Module) -> bool:
    """Whether the UNet's self-attention runs through torch's scaled_dot_product_attention."""
    return any(getattr(m, "use_flash_attention", False) for m in unet.modules())


def old_key(new_key: str) -> str:
    """The monai-generative name of a new-layout UNet key (the mirror image of MONAI's `load_old_state_dict`)."""
    key = re.sub(rf"^({ATTENTION_BLOCK_NAME.pattern})\.attn\.(to_[qkv])\.", r"\1.\3.", new_key)
    return key.replace(".postconv.", ".conv.")


@dataclass(frozen=True)
class BackboneLoadReport:
    """What loading a backbone checkpoint did."""

    source: str
    key_format: str  # "new" (MONAI >= 1.4) or "old" (monai-generative, the model-zoo bundle)
    loaded: int  # tensors loaded into the UNet
    unused: tuple[str, ...]  # checkpoint keys left unused (old layout: the self-attention output projections)

    def summary(self) -> str:
        unused = f", {len(self.unused)} unused ({', '.join(self.unused)})" if self.unused else ""
        return f"{self.source}: {self.loaded} tensors loaded from the {self.key_format} key layout{unused}"


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors from a `.pt`/`.pth` (torch.save, tensors only) or `.safetensors` file."""
    return read_state_dict_file(path, "backbone checkpoint", wrappers=("state_dict", "model", "diffusion_model"))


def _keys_text(keys: set[str]) -> str:
    shown = sorted(keys)[:_MAX_KEYS_IN_ERROR]
    more = f" (+{len(keys) - len(shown)} more)" if len(keys) > len(shown) else ""
    return ", ".join(shown) + more


def _check_keys(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], unused_ok: set[str],
                source: str, key_format: str) -> None:
    """Refuse missing keys, unexpected keys (other than `unused_ok`) and shape mismatches, naming the keys."""
    missing = set(expected) - set(state)
    if missing:
        raise DemistError(f"{source}: missing key(s) {_keys_text(missing)} for the {key_format} key layout; "
                          "expected a checkpoint of the configured [unet] architecture")
    unexpected = set(state) - set(expected) - unused_ok
    if unexpected:
        raise DemistError(f"{source}: unexpected key(s) {_keys_text(unexpected)} for the {key_format} key layout; "
                          "expected a checkpoint of the configured [unet] architecture")
    for key, reference in expected.items():
        if tuple(state[key].shape) != tuple(reference.shape):
            raise DemistError(f"{source}: key {key} has shape {tuple(state[key].shape)}; expected "
                              f"{tuple(reference.shape)} for the configured [unet] architecture")
        if not state[key].is_floating_point():
            raise DemistError(f"{source}: key {key} has dtype {state[key].dtype}; expected floating point weights")


def load_backbone_state_dict(unet: DiffusionModelUNet, state: Mapping[str, torch.Tensor],
                             source: str = "backbone checkpoint") -> BackboneLoadReport:
    """Load a state dict of either key layout into `unet` after a key-by-key check; returns what was done."""
    new_expected = unet.state_dict()
    old_expected = {old_key(k): v for k, v in new_expected.items()}
    proj_attn = {k for k in state if _UNUSED_OLD_KEY.fullmatch(k)}
    # The layout is the one the checkpoint's keys match better; the check below then names every mismatch.
    new_misfit = len(set(state) ^ set(new_expected))
    old_misfit = len((set(state) - proj_attn) ^ set(old_expected))
    if new_misfit <= old_misfit:
        _check_keys(state, new_expected, set(), source, "new")
        unet.load_state_dict(dict(state), strict=True)
        report = BackboneLoadReport(source, "new", len(new_expected), ())
    else:
        _check_keys(state, old_expected, proj_attn, source, "old")
        remaining = dict(state)  # MONAI pops the keys it uses from the dict it is given
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            unet.load_old_state_dict(remaining)
        if printed.getvalue().strip():
            logger.debug("MONAI load_old_state_dict: %s", printed.getvalue().strip())
        loaded = unet.state_dict()
        for key, value in loaded.items():  # MONAI's mapping and ours must agree tensor by tensor
            if not torch.equal(value, state[old_key(key)].to(value.dtype)):
                raise RuntimeError(f"old-layout mapping disagrees with MONAI's for {key}")  # a bug, not user input
        if set(remaining) != proj_attn:
            raise RuntimeError(f"MONAI left unexpected keys unused: {sorted(set(remaining) - proj_attn)}")  # a bug
        report = BackboneLoadReport(source, "old", len(loaded), tuple(sorted(remaining)))
    logger.info(report.summary())
    return report


def load_backbone_checkpoint(path: str | Path, unet_cfg: UNetConfig, latent_channels: int = 8,
                             use_flash_attention: bool = False) -> tuple[DiffusionModelUNet, BackboneLoadReport]:
    """Build the configured UNet and load a checkpoint of either key layout into it (not yet frozen)."""
    state = read_checkpoint(path)
    unet = build_unet(unet_cfg, latent_channels, use_flash_attention)
    return unet, load_backbone_state_dict(unet, state, source=str(path))
