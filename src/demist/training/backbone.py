"""Backbone pretraining: an unconditional latent UNet learns the prior of PSR latents (when no bundle is at hand).

The frozen E_PSR of a Stage-1 run encodes each PSR map once, whole (`latent_patches`); the latent is z_y = μ × the run's
latent scale factor, and training draws latent patches of it. A MONAI
`DiffusionModelUNet` (config [unet]) learns to denoise z_y under the config's noise schedule and prediction target
([diffusion]; x0 = "sample" in the tiny preset, which trains a usable prior within CPU budgets). The run it writes
(stage "backbone", component "unet") is what `demist train demist --backbone` freezes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from demist.config import Config
from demist.data.manifest import training_records
from demist.data.patches import load_sessions
from demist.diffusion.schedule import NoiseSchedule
from demist.models.autoencoder import downsampling_factor
from demist.models.backbone import build_unet
from demist.models.from_runs import BACKBONE_STAGE, PSR_DIGEST, load_stage1
from demist.runs import RunInfo, state_digest, write_run
from demist.training.latent_diffusion import (check_against_stage1, denoising_error, module_device, resolve_config,
                                              sample_noising)
from demist.training.latent_patches import LatentPatchSampler, encode_sessions, encoding_device
from demist.training.loop import Phase, Stage, seed_everything, train, warmup_cosine
from demist.training.run_output import barrier, check_out, training_record, weights_metadata

logger = logging.getLogger(__name__)


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
    schedule = NoiseSchedule.from_config(cfg.diffusion)

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
                        training=training_record(result, sessions, manifest, subjects, latent_encoding="mu", **{
                            PSR_DIGEST: state_digest(stage1.psr_autoencoder.state_dict())}),
                        metrics={"eval_denoising_mse_before": before, "eval_denoising_mse_after": after})
    barrier()
    return run
