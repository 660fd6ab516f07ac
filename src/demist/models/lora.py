"""Adaptive stream: LoRA on the attention projections of every self-attention block of the frozen backbone (peft).

Targets are chosen by name under the attention blocks, never by layer type: the UNet's other Linear layers (the
time-embedding MLP, each ResNet block's `time_emb_proj`) are not attention projections. With `include_fc=False` (the
bundle) a block has no output projection, i.e. W_O = I. The paper puts LoRA on W_O too, so
`add_identity_output_projections` gives each block a frozen identity `nn.Linear` there (which changes nothing) for
LoRA to adapt. peft is imported lazily (it takes seconds).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from demist.models.backbone import ATTENTION_BLOCK_NAME, attention_block_names

# `.block` appears once the block has been wrapped with cross-attention (crossattn.CrossAttentionWrapper).
_TARGET_NAME = re.compile(rf"{ATTENTION_BLOCK_NAME.pattern}(\.block)?\.attn\.(to_[qkv]|out_proj)")
LORA_KEY_MARK = ".lora_"
_IDENTITY_MARK = "demist_identity_projection"  # set on the identity W_O layers this module adds


def add_identity_output_projections(unet: nn.Module) -> list[nn.Linear]:
    """Give every self-attention block without an output projection a frozen identity one, in place (its output is
    unchanged: x·I + 0 is exact in floating point); returns the new layers."""
    added = []
    for name in attention_block_names(unet):
        attn = unet.get_submodule(name).attn
        if attn.include_fc:
            continue
        layer = nn.Linear(attn.inner_dim, attn.hidden_input_size)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(attn.hidden_input_size, attn.inner_dim))
            layer.bias.zero_()
        layer.requires_grad_(False)
        setattr(layer, _IDENTITY_MARK, True)
        attn.out_proj, attn.include_fc = layer, True
        added.append(layer)
    return added


def lora_target_names(unet: nn.Module) -> list[str]:
    """Names of the q/k/v (and, where it is a Linear, output) projections of the UNet's self-attention blocks."""
    names = [name for name, module in unet.named_modules()
             if _TARGET_NAME.fullmatch(name) and not isinstance(module, nn.Identity)]
    for name in names:
        if not isinstance(unet.get_submodule(name), nn.Linear):
            raise TypeError(f"{name} is {type(unet.get_submodule(name)).__name__}; expected a plain nn.Linear")
    return names


def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers inside `module`, by name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def inject_lora(unet: nn.Module, rank: int, alpha: float) -> list[str]:
    """Add LoRA (W + alpha/rank · B·A, B = 0 at first) to every self-attention projection of `unet`, in place.

    Load pretrained weights before calling this: peft renames the wrapped weights (`to_q.weight` becomes
    `to_q.base_layer.weight`). peft also switches off gradients for all non-LoRA parameters of `unet`.
    Returns the names of the layers that received LoRA.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_target_names(unet)
    if not targets:
        raise ValueError("the UNet has no self-attention blocks; expected attention at one level at least")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=targets)
    inject_adapter_in_model(config, unet)
    injected = sorted(lora_layers(unet))
    if injected != sorted(targets):  # peft matches by suffix too; make sure nothing else was touched
        raise RuntimeError(f"LoRA went to {injected}; expected exactly {sorted(targets)}")
    return targets


def merge_lora(module: nn.Module) -> None:
    """Fold each LoRA update into its base weight (inference: no extra cost per step). Reversible by `unmerge_lora`.

    An added identity W_O stays unmerged: merged, its diagonal 1 + Δ would lose Δ's small part to bf16 autocast
    (spacing 2⁻⁷ near 1), whereas unmerged the update runs as its own small matmul and keeps it."""
    for layer in lora_layers(module).values():
        if not layer.merged and not getattr(layer.get_base_layer(), _IDENTITY_MARK, False):
            layer.merge()


def unmerge_lora(module: nn.Module) -> None:
    """Subtract the LoRA updates from the base weights again (exact up to float rounding)."""
    for layer in lora_layers(module).values():
        if layer.merged:
            layer.unmerge()


def lora_is_merged(module: nn.Module) -> bool:
    """Whether any LoRA layer inside `module` is currently merged (`merge_lora` leaves identity W_O layers out)."""
    return any(layer.merged for layer in lora_layers(module).values())
