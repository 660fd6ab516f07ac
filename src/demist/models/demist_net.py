"""DEMIST's Stage-2 network: a frozen unconditional latent UNet conditioned on z_c by three switchable streams.

- semantic: z_c → tokens (`tokens.TokenEncoder`) → new cross-attention around every self-attention block;
- spatial: a gated ControlNet copy of the encoder, whose outputs are added to the frozen skip connections (its hint
  is z_c, and with `controlnet_hint = "latent+image"` or `"latent+subpixel"` also T1w + FLAIR, `embed_image`; with
  `controlnet_output_head` its full-resolution output also reaches the prediction directly);
- adaptive: LoRA on the q/k/v (and output) projections of every self-attention block.
Every new path ends in a zero-initialised layer, so an untrained DemistNet predicts exactly what its backbone
predicts. Only the new
parts train and only they are saved (`trainable_state_dict`); the backbone's weights are stored once, in its own run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from demist.config_sections import STREAM_SWITCHES, DemistConfig, UNetConfig
from demist.devices import bf16_autocast
from demist.errors import DemistError
from demist.models.backbone import freeze, uses_flash_attention
from demist.models.controlnet import OutputHead, build_gated_controlnet, build_image_hint, zero_initialised_modules
from demist.models.crossattn import TokenSlot, add_cross_attention, cross_attention_wrappers
from demist.models.lora import (LORA_KEY_MARK, add_identity_output_projections, inject_lora, lora_is_merged,
                                lora_layers, merge_lora, unmerge_lora)
from demist.models.tokens import TokenEncoder

logger = logging.getLogger(__name__)

STREAMS = tuple(STREAM_SWITCHES)  # semantic, spatial, adaptive


class DemistNet(nn.Module):
    """`forward(x_t, t, z_c, image_hint)` → the backbone's prediction target (ε, v or x0), conditioned on z_c (and,
    with an image hint, on `embed_image(T1w + FLAIR)`).

    Takes ownership of `backbone` and changes it in place (LoRA layers, cross-attention wrappers); its pretrained
    weights stay frozen and unchanged (unless LoRA is merged, see `merge_lora`).
    """

    def __init__(self, backbone: DiffusionModelUNet, demist_cfg: DemistConfig, unet_cfg: UNetConfig,
                 latent_channels: int) -> None:
        super().__init__()
        _check_backbone(backbone, unet_cfg, latent_channels)
        if demist_cfg.lora and demist_cfg.lora_rank < 1:
            raise DemistError(f"config key demist.lora_rank: got {demist_cfg.lora_rank}; expected at least 1")
        self.latent_channels = latent_channels
        self.downsampling = 2 ** (len(unet_cfg.channels) - 1)
        self.streams = {stream: getattr(demist_cfg, switch) for stream, switch in STREAM_SWITCHES.items()}
        flash = uses_flash_attention(backbone)
        freeze(backbone)
        pretrained = {id(t) for t in backbone.state_dict(keep_vars=True).values()}
        self.backbone = backbone

        # Order matters: the ControlNet copies the backbone's weights under their original names, peft then
        # renames the q/k/v weights, and the cross-attention wrappers go around the (LoRA-carrying) blocks last.
        self.gate_init = demist_cfg.controlnet_gate_init
        self.controlnet = (build_gated_controlnet(backbone, unet_cfg, latent_channels, flash, self.gate_init)
                           if demist_cfg.controlnet else None)
        self.image_hint = (build_image_hint(unet_cfg.channels[0], demist_cfg.hint_channels, self.gate_init,
                                            demist_cfg.controlnet_hint) if demist_cfg.uses_image_hint else None)
        self.hint_bf16 = demist_cfg.hint_bf16
        self.output_head = (OutputHead(unet_cfg.channels[0], latent_channels) if demist_cfg.uses_output_head
                            else None)
        if demist_cfg.lora:
            if demist_cfg.lora_output_projection:  # identity W_O layers are part of the frozen backbone
                pretrained |= {id(p) for layer in add_identity_output_projections(backbone)
                               for p in layer.parameters()}
            inject_lora(backbone, demist_cfg.lora_rank, demist_cfg.lora_alpha)
        self._tokens = TokenSlot()
        if demist_cfg.crossattn:
            self.token_encoder = TokenEncoder(latent_channels, demist_cfg.token_dim, demist_cfg.token_grid)
            self.crossattn_blocks = add_cross_attention(backbone, demist_cfg.token_dim, self._tokens)
        else:
            self.token_encoder = None
            self.crossattn_blocks = []

        # Everything new trains, the pretrained tensors do not (peft froze all it saw; set both sides explicitly).
        for param in self.parameters():
            param.requires_grad_(id(param) not in pretrained)
        self._frozen_keys = frozenset(k for k, t in self.state_dict(keep_vars=True).items() if id(t) in pretrained)
        logger.info("DemistNet streams %s; parameters %s", self.streams, self.parameter_counts())

    # ----------------------------------------------------------------------------------------------- forward
    @property
    def uses_image(self) -> bool:
        """Whether the ControlNet's hint includes T1w + FLAIR, by either image hint (pass `image_hint` to forward)."""
        return self.image_hint is not None

    def embed_image(self, image: torch.Tensor, bf16: bool | None = None) -> torch.Tensor:
        """T1w + FLAIR (B, 2, 4X, 4Y, 4Z) → the image hint at latent resolution. It does not depend on x_t or t, so
        a sampler computes it once per volume. `bf16`: under bf16 autocast (where the hardware has it), or not; None
        is the training setting `demist.hint_bf16` (a synthesizer passes its own precision)."""
        if self.image_hint is None:
            raise RuntimeError("embed_image: this DemistNet has no image hint (demist.controlnet_hint = 'latent')")
        if not (self.hint_bf16 if bf16 is None else bf16):
            return self.image_hint(image)
        with bf16_autocast(image.device):
            return self.image_hint(image).float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z_c: torch.Tensor,
                image_hint: torch.Tensor | None = None) -> torch.Tensor:
        """x_t, z_c: (B, latent_channels, X, Y, Z) with X, Y, Z multiples of the UNet's downsampling; t: (B,);
        image_hint: `embed_image(...)` of the same region, required exactly when the net uses the image."""
        self._check_inputs(x_t, t, z_c, image_hint)
        hint = z_c if image_hint is None else torch.cat([z_c, image_hint.to(z_c.dtype)], dim=1)
        down, mid = (self.controlnet(x_t, t, controlnet_cond=hint) if self.controlnet is not None else (None, None))
        tokens = self.token_encoder(z_c) if self.token_encoder is not None else None
        with self._tokens.holding(tokens):
            prediction = self.backbone(x_t, t, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        if self.output_head is not None:
            prediction = prediction + self.output_head(down, x_t.shape[2:])
        return prediction

    def _check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, z_c: torch.Tensor,
                      image_hint: torch.Tensor | None) -> None:
        if x_t.ndim != 5 or x_t.shape[1] != self.latent_channels:
            raise DemistError(f"x_t: shape {tuple(x_t.shape)}; expected (B, {self.latent_channels}, X, Y, Z)")
        if z_c.shape != x_t.shape:
            raise DemistError(f"z_c: shape {tuple(z_c.shape)}; expected the shape of x_t, {tuple(x_t.shape)}")
        if any(s % self.downsampling for s in x_t.shape[2:]):
            raise DemistError(f"x_t: spatial size {tuple(x_t.shape[2:])}; expected multiples of {self.downsampling}")
        if t.ndim != 1 or t.shape[0] != x_t.shape[0]:
            raise DemistError(f"t: shape {tuple(t.shape)}; expected ({x_t.shape[0]},), one timestep per sample")
        if (image_hint is None) == self.uses_image:
            raise DemistError("image_hint: " + ("missing; this net's ControlNet also sees the image (embed_image)"
                                                if self.uses_image else "given to a net whose hint is z_c only"))
        if image_hint is not None and (image_hint.shape[0] != x_t.shape[0] or image_hint.shape[2:] != x_t.shape[2:]):
            raise DemistError(f"image_hint: shape {tuple(image_hint.shape)}; expected batch and spatial size of x_t, "
                              f"{tuple(x_t.shape)}")

    # ------------------------------------------------------------------------------------------------- LoRA
    @property
    def lora_targets(self) -> list[str]:
        """Names (inside the backbone) of the q/k/v layers that carry LoRA."""
        return sorted(lora_layers(self.backbone))

    def merge_lora(self) -> None:
        """Fold LoRA into the backbone's attention weights for inference (in memory; see `unmerge_lora`)."""
        merge_lora(self.backbone)

    def unmerge_lora(self) -> None:
        """Undo `merge_lora` (exact up to float rounding)."""
        unmerge_lora(self.backbone)

    @property
    def lora_merged(self) -> bool:
        return lora_is_merged(self.backbone)

    # ------------------------------------------------------------------------------------------ checkpoints
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained parts only (token encoder, cross-attention, ControlNet, LoRA factors), by state-dict key."""
        return {k: v for k, v in self.state_dict().items() if k not in self._frozen_keys}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load what `trainable_state_dict` saved; every key is checked, and a mismatch names it."""
        expected = self.trainable_state_dict()
        on = ", ".join(f"{switch}={self.streams[stream]}" for stream, switch in STREAM_SWITCHES.items())
        for key in sorted(set(expected) - set(state)):
            raise DemistError(f"{source}: missing key {key}; expected the trained parts of a DemistNet with {on}")
        for key in sorted(set(state) - set(expected)):
            raise DemistError(f"{source}: unexpected key {key}; expected the trained parts of a DemistNet with {on}")
        for key, reference in expected.items():
            if tuple(state[key].shape) != tuple(reference.shape):
                raise DemistError(f"{source}: key {key} has shape {tuple(state[key].shape)}; "
                                  f"expected {tuple(reference.shape)}")
        merged = self.lora_merged
        if merged:  # new LoRA factors must not be loaded under a merged copy of the old ones
            self.unmerge_lora()
        result = self.load_state_dict(dict(state), strict=False)
        if set(result.missing_keys) != self._frozen_keys or result.unexpected_keys:
            raise RuntimeError("trainable/frozen key split is inconsistent")  # a bug, not user input
        if merged:
            self.merge_lora()

    # ------------------------------------------------------------------------------------------- reporting
    def stream_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The parameters of the backbone and of each stream (empty lists for streams that are off)."""
        groups: dict[str, list[nn.Parameter]] = {name: [] for name in ("backbone", *STREAMS)}
        if self.token_encoder is not None:
            groups["semantic"] += list(self.token_encoder.parameters())
        for wrapper in cross_attention_wrappers(self.backbone):
            groups["semantic"] += [p for m in wrapper.new_modules() for p in m.parameters()]
        if self.controlnet is not None:
            groups["spatial"] += list(self.controlnet.parameters())
        if self.image_hint is not None:
            groups["spatial"] += list(self.image_hint.parameters())
        if self.output_head is not None:
            groups["spatial"] += list(self.output_head.parameters())
        for layer in lora_layers(self.backbone).values():
            groups["adaptive"] += list(layer.lora_A.parameters()) + list(layer.lora_B.parameters())
        claimed = {id(p) for params in groups.values() for p in params}
        groups["backbone"] = [p for p in self.backbone.parameters() if id(p) not in claimed]
        return groups

    def zero_initialised_parameters(self) -> list[nn.Parameter]:
        """The trainable tensors that start at zero, whose growth lets the conditioning in: the ControlNet's output
        gates (and input gate or image-hint output when they start at zero), the cross-attention output projections
        and LoRA-B. Training may give them their own learning rate (`demist.zero_init_lr_scale`)."""
        modules: list[nn.Module] = []
        if self.controlnet is not None:
            modules += zero_initialised_modules(self.controlnet, self.gate_init)
        if self.image_hint is not None and self.gate_init == "zero":
            modules.append(self.image_hint.conv_out)
        modules += [w.cross_attention.out_proj for w in cross_attention_wrappers(self.backbone)]
        modules += [layer.lora_B for layer in lora_layers(self.backbone).values()]
        params = {id(p): p for m in modules for p in m.parameters() if p.requires_grad}
        return list(params.values())

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """Trainable and frozen parameter counts of the backbone, each stream, and in total (JSON-ready)."""
        counts = {}
        for name, params in self.stream_parameters().items():
            counts[name] = {"trainable": sum(p.numel() for p in params if p.requires_grad),
                            "frozen": sum(p.numel() for p in params if not p.requires_grad)}
        counts["total"] = {kind: sum(c[kind] for c in counts.values()) for kind in ("trainable", "frozen")}
        return counts


def _check_backbone(backbone: nn.Module, unet_cfg: UNetConfig, latent_channels: int) -> None:
    """The backbone must be the unconditional UNet the config describes, still without LoRA or wrappers."""
    if not isinstance(backbone, DiffusionModelUNet) or backbone.with_conditioning:
        raise TypeError("backbone: expected an unconditional monai DiffusionModelUNet (with_conditioning=False)")
    if backbone.in_channels != latent_channels or backbone.out_channels != latent_channels:
        raise DemistError(f"backbone: {backbone.in_channels} in / {backbone.out_channels} out channels; "
                          f"expected {latent_channels} (the autoencoder's latent channels)")
    if tuple(backbone.block_out_channels) != tuple(unet_cfg.channels):
        raise DemistError(f"backbone: channels {tuple(backbone.block_out_channels)}; "
                          f"expected {tuple(unet_cfg.channels)} from config [unet]")
    if any(LORA_KEY_MARK in k or ".block." in k for k in backbone.state_dict()):
        raise TypeError("backbone: already carries LoRA or cross-attention; expected a plain DiffusionModelUNet")
