"""Backbone pretraining: an unconditional latent UNet learns the prior of PSR latents (when no bundle is at hand).

The frozen E_PSR of a Stage-1 run encodes each PSR map once, whole (`latent_patches`); the latent is z_y = μ × the run's
latent scale factor, and training draws latent patches of it. A MONAI
`DiffusionModelUNet` (config [unet]) learns to denoise z_y under the config's noise schedule and prediction target
([diffusion]; x0 = "sample" in the tiny preset, which trains a usable prior within CPU budgets). The run it writes
(stage "backbone", component "unet") is what `demist train demist --backbone` freezes. This module also holds what
Stage 2 shares with it: the Stage-1 parts, the latent encoder, the noise schedule and the evaluation of denoising.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from demist.config import Config, DiffusionConfig, load_config
from demist.data.manifest import training_records
from demist.data.patches import load_sessions
from demist.diffusion.schedule import NoiseSchedule
from demist.errors import DemistError
from demist.models.autoencoder import autoencoder_from_state, downsampling_factor, encode_windowed
from demist.models.backbone import build_unet, freeze, load_backbone_state_dict
from demist.runs import RunInfo, read_run, state_digest, write_run
from demist.training.latent_patches import LatentPatchSampler, encode_sessions, encoding_device
from demist.training.loop import Phase, Stage, seed_everything, train, warmup_cosine
from demist.training.run_output import barrier, check_out, weights_metadata

logger = logging.getLogger(__name__)

BACKBONE_STAGE = "backbone"
#: Key of a backbone run's training record: the digest of the PSR autoencoder whose latent the UNet learned.
PSR_DIGEST = "psr_autoencoder_digest"
#: Timesteps (fractions of T) at which the denoising error is measured on fixed evaluation patches.
EVAL_TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
EVAL_SEED = 12345


# --- inputs shared with Stage 2 ---------------------------------------------------------------------------------


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


@dataclass
class Stage1Parts:
    """A finished Stage-1 run and its autoencoders (CPU, frozen)."""

    run: RunInfo
    psr_autoencoder: nn.Module
    cond_autoencoder: nn.Module
    scale_factor: float


def load_stage1(path: str | Path, what: str = "--stage1") -> Stage1Parts:
    """Read a Stage-1 run; both autoencoders are returned frozen."""
    run = read_run(path, "stage1", what=what)
    if run.latent_scale_factor is None or not run.latent_scale_factor > 0:
        raise DemistError(f"{what} {path}: run.json has no positive latent_scale_factor; expected a Stage-1 run "
                          "written by `demist train stage1` or `demist train align`")
    ae_cfg = run.config.autoencoder
    return Stage1Parts(run=run, scale_factor=float(run.latent_scale_factor),
                       psr_autoencoder=freeze(autoencoder_from_state(ae_cfg, run.weights("psr_autoencoder"))),
                       cond_autoencoder=freeze(autoencoder_from_state(ae_cfg, run.weights("cond_autoencoder"))))


def check_against_stage1(cfg: Config, stage1: RunInfo, unet_levels: int) -> None:
    """[autoencoder] and [data] (except the patch size) must be Stage 1's; patches must fit both networks."""
    cfg.require_same(stage1.config, ("autoencoder", "data"), f"--stage1 {stage1.path}")
    multiple = downsampling_factor(cfg.autoencoder) * 2 ** (unet_levels - 1)
    if any(p % multiple for p in cfg.data.patch_size):
        raise DemistError(f"config key data.patch_size: {tuple(cfg.data.patch_size)}; expected multiples of "
                          f"{multiple} (autoencoder and UNet downsampling)")


def noise_schedule(diffusion: DiffusionConfig, prediction_type: str | None = None) -> NoiseSchedule:
    """The config's noise schedule, predicting `prediction_type` (default: the config's)."""
    return NoiseSchedule.create(num_train_timesteps=diffusion.num_train_timesteps,
                                beta_schedule=diffusion.beta_schedule, beta_start=diffusion.beta_start,
                                beta_end=diffusion.beta_end,
                                prediction_type=prediction_type or diffusion.prediction_type)


def sample_noising(z0: torch.Tensor, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, target) for a batch of clean latents: uniform timesteps, Gaussian noise (from the seeded RNG)."""
    t = torch.randint(0, schedule.num_train_timesteps, (z0.shape[0],), device=z0.device)
    noise = torch.randn_like(z0, dtype=torch.float32)
    return schedule.add_noise(z0, noise, t), t, schedule.training_target(z0, noise, t)


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


# --- the stage ----------------------------------------------------------------------------------------------------


def backbone_stage(cfg: Config, unet: nn.Module, schedule: NoiseSchedule, sampler: LatentPatchSampler) -> Stage:
    """One phase: ‖target − UNet(x_t, t)‖² on latent patches z_y = μ(E_PSR(y)) × scale factor."""

    def denoise_loss(m, batch, step, ctx):
        x_t, t, target = sample_noising(batch["z_y"].float(), schedule)
        prediction = m["unet"](x_t, t)
        return {"loss": ((prediction.float() - target) ** 2).mean()}

    steps = cfg.backbone.steps
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.backbone.learning_rate)
    return Stage(name=BACKBONE_STAGE, modules={"unet": unet},
                 phases=[Phase("denoise", optimizer, denoise_loss, warmup_cosine(optimizer, steps))],
                 batch=sampler.batch, steps=steps)


def train_backbone(manifest: str | Path, stage1_run: str | Path, config: Config | str | Path, out: str | Path,
                   max_steps: int | None = None, device: str = "auto", resume: bool = False,
                   subjects: Sequence[str] | None = None, tensorboard: bool = False) -> RunInfo | None:
    """Pretrain the unconditional latent UNet into the run directory `out` (stage "backbone", component "unet").

    Returns the run (None on the non-main processes of a multi-process launch).
    """
    out, cfg = Path(out), resolve_config(config)
    check_out(out, resume)
    if max_steps is not None:
        cfg = cfg.replace(backbone=dataclasses.replace(cfg.backbone, steps=max_steps))
    stage1 = load_stage1(stage1_run)
    check_against_stage1(cfg, stage1.run, len(cfg.unet.channels))
    records = training_records(manifest, subjects)
    sessions = load_sessions(records, cfg.data, need_target=True)
    latents = encode_sessions(sessions, {"z_y": (stage1.psr_autoencoder, "target")}, stage1.scale_factor,
                              cfg.autoencoder.patch_size, downsampling_factor(cfg.autoencoder), cfg.data.patch_size,
                              encoding_device(device))
    sampler = LatentPatchSampler(latents, cfg.data.patch_size, downsampling_factor(cfg.autoencoder),
                                 cfg.backbone.batch_size, cfg.train.seed, image_keys=())
    schedule = noise_schedule(cfg.diffusion)

    seed_everything(cfg.train.seed)
    unet = build_unet(cfg.unet, cfg.autoencoder.latent_channels, use_flash_attention=True)
    logger.info("backbone: %d sessions, %.2f M parameters, prediction target %s, %d steps",
                len(sessions), sum(p.numel() for p in unet.parameters()) / 1e6, schedule.prediction_type,
                cfg.backbone.steps)
    eval_latents = torch.cat([b["z_y"] for b in sampler.evaluation_batches()])
    before = denoising_error(unet, eval_latents, schedule)
    stage = backbone_stage(cfg, unet, schedule, sampler)
    result = train(stage, out, cfg.train, device=device, resume=resume, tensorboard=tensorboard,
                   weights_metadata=weights_metadata(cfg, BACKBONE_STAGE))
    run = None
    if result.is_main_process:
        after = denoising_error(unet.eval(), eval_latents.to(module_device(unet)), schedule)
        logger.info("backbone: denoising MSE (%s) on evaluation patches %.4g before, %.4g after training",
                    schedule.prediction_type, before["mean"], after["mean"])
        run = write_run(out, method="demist", stage=BACKBONE_STAGE, config=cfg, components={"unet": unet.state_dict()},
                        parents={"stage1": stage1.run}, latent_scale_factor=stage1.scale_factor,
                        prediction_type=schedule.prediction_type,
                        training={"steps": result.steps, "processes": result.processes,
                                  "mixed_precision": result.mixed_precision, "device": result.device,
                                  "sessions": [s.key for s in sessions], "subjects": list(subjects or []) or None,
                                  "manifest": str(Path(manifest).resolve()), "latent_encoding": "mu",
                                  PSR_DIGEST: state_digest(stage1.psr_autoencoder.state_dict())},
                        metrics={"eval_denoising_mse_before": before, "eval_denoising_mse_after": after})
    barrier()
    return run


def lives_in_latent_of(backbone: RunInfo, stage1: Stage1Parts) -> bool:
    """Whether a backbone was pretrained in Stage 1's latent: trained on that very run, or on one with the same PSR
    autoencoder weights and latent scale factor (a backbone shipped as a prior, used with a Stage 1 aligned later)."""
    if backbone.parents.get("stage1", {}).get("sha256") == stage1.run.run_json_sha256:
        return True
    digest = backbone.training.get(PSR_DIGEST)
    return (digest is not None and digest == state_digest(stage1.psr_autoencoder.state_dict())
            and backbone.latent_scale_factor == stage1.scale_factor)


def load_backbone_run(path: str | Path, what: str = "--backbone",
                      use_flash_attention: bool = True) -> tuple[RunInfo, nn.Module]:
    """A finished backbone run and its UNet (CPU, not frozen yet)."""
    run = read_run(path, BACKBONE_STAGE, what=what)
    if run.prediction_type is None:
        raise DemistError(f"{what} {path}: run.json names no prediction_type; expected a backbone run")
    unet = build_unet(run.config.unet, run.config.autoencoder.latent_channels, use_flash_attention)
    load_backbone_state_dict(unet, run.weights("unet"), source=f"{what} {path}")
    return run, unet
