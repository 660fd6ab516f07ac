"""What the latent-diffusion stages share (backbone pretraining, DEMIST's Stage 2, FT-LDM): the config, the latent
encoder, the Stage-1 check, the noising of training batches, and the denoising error on fixed evaluation patches."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from demist.config import Config, load_config
from demist.diffusion.schedule import NoiseSchedule
from demist.errors import DemistError
from demist.models.autoencoder import downsampling_factor, encode_windowed
from demist.runs import RunInfo

#: Timesteps (fractions of T) at which the denoising error is measured on fixed evaluation patches.
EVAL_TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
EVAL_SEED = 12345


def resolve_config(config: Config | str | Path) -> Config:
    """A Config as given, or loaded from a preset name / TOML file."""
    return config if isinstance(config, Config) else load_config(config)


class LatentEncoder(nn.Module):
    """An autoencoder's encoder as a module whose forward is z = μ × scale factor (the latent diffusion works in).

    A module of its own so that the loop can train it (fine-tuning E_cond) through `forward`.
    """

    def __init__(self, autoencoder: nn.Module, scale_factor: float, window: Sequence[int]) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.scale_factor = float(scale_factor)
        self.window = tuple(window)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return encode_windowed(self.autoencoder, image, self.window) * self.scale_factor


def check_against_stage1(cfg: Config, stage1: RunInfo, unet_levels: int) -> None:
    """[autoencoder] and [data] (except the patch size) must be Stage 1's; patches must fit both networks."""
    cfg.require_same(stage1.config, ("autoencoder", "data"), f"--stage1 {stage1.path}")
    multiple = downsampling_factor(cfg.autoencoder) * 2 ** (unet_levels - 1)
    if any(p % multiple for p in cfg.data.patch_size):
        raise DemistError(f"config key data.patch_size: {tuple(cfg.data.patch_size)}; expected multiples of "
                          f"{multiple} (autoencoder and UNet downsampling)")


def check_sampling_tile(cfg: Config) -> None:
    """Synthesis runs the UNet in tiles of sampling.tile_size, whose GroupNorm, attention and token grid must see the
    field they were trained on: the latent patch."""
    factor = downsampling_factor(cfg.autoencoder)
    patch = tuple(int(p) // factor for p in cfg.data.patch_size)
    if tuple(cfg.sampling.tile_size) != patch:
        raise DemistError(f"config key sampling.tile_size: got {list(cfg.sampling.tile_size)}; expected the Stage-2 "
                          f"latent patch {list(patch)} (data.patch_size {list(cfg.data.patch_size)} / {factor})")


def sample_noising(z0: torch.Tensor, schedule: NoiseSchedule, timestep_power: float = 1.0,
                   input_perturbation: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, target) for a batch of clean latents: Gaussian noise and timesteps t = ⌊T·u^p⌋, u ~ U(0, 1) (p = 1:
    uniform), from the seeded RNG. With `input_perturbation` γ > 0, x_t is noised with ε + γ·ξ while the target is
    that of ε (input perturbation against exposure bias)."""
    if timestep_power == 1.0:
        t = torch.randint(0, schedule.num_train_timesteps, (z0.shape[0],), device=z0.device)
    else:
        u = torch.rand(z0.shape[0], device=z0.device) ** timestep_power
        t = (u * schedule.num_train_timesteps).long().clamp(max=schedule.num_train_timesteps - 1)
    noise = torch.randn_like(z0, dtype=torch.float32)
    seen = noise if input_perturbation == 0.0 else noise + input_perturbation * torch.randn_like(noise)
    return schedule.add_noise(z0, seen, t), t, schedule.training_target(z0, noise, t)


@torch.no_grad()
def denoising_error(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z0: torch.Tensor,
                    schedule: NoiseSchedule) -> dict[str, float]:
    """Mean squared error of the prediction target on fixed latents `z0` (N, C, X, Y, Z), fixed timesteps and noise.

    `predict(x_t, t)` is the network's output for all N latents noised to x_t at once; keys are "t=<t>" and "mean".
    """
    total = schedule.num_train_timesteps
    generator = torch.Generator().manual_seed(EVAL_SEED)
    errors: dict[str, float] = {}
    for t_value in [int(round(f * (total - 1))) for f in EVAL_TIMESTEP_FRACTIONS]:
        noise = torch.randn(z0.shape, generator=generator).to(z0.device)
        t = torch.full((z0.shape[0],), t_value, dtype=torch.long, device=z0.device)
        x_t = schedule.add_noise(z0, noise, t)
        errors[f"t={t_value}"] = float(((predict(x_t, t).float() - schedule.training_target(z0, noise, t)) ** 2).mean())
    errors["mean"] = sum(errors.values()) / len(EVAL_TIMESTEP_FRACTIONS)
    return errors


@torch.no_grad()
def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def conditioned_denoising_error(net: nn.Module, batches: Sequence[dict[str, torch.Tensor]], schedule: NoiseSchedule,
                                cond_encoder: LatentEncoder | None = None) -> dict[str, float]:
    """Denoising MSE of net(x_t, t, z_c) on fixed evaluation latent patches; z_c from the batches, or encoded from
    their images when E_cond is fine-tuned. (DEMIST before training: the backbone's own, all streams at 0.)"""
    device = module_device(net)
    z_y = torch.cat([b["z_y"] for b in batches]).to(device)
    if cond_encoder is None:
        z_c = torch.cat([b["z_c"] for b in batches]).to(device)
    else:
        cond_encoder.to(device)
        z_c = torch.cat([cond_encoder(b["cond"].to(device)).float() for b in batches])
    if getattr(net, "uses_image", False):  # a DemistNet whose ControlNet also sees the image patches
        hint = torch.cat([net.embed_image(b["cond"].to(device)) for b in batches])
        return denoising_error(lambda x_t, t: net(x_t, t, z_c, hint), z_y, schedule)
    return denoising_error(lambda x_t, t: net(x_t, t, z_c), z_y, schedule)
