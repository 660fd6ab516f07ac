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
from demist.diffusion.schedule import NoiseSchedule
from demist.models.backbone import build_unet
from demist.models.from_runs import BACKBONE_STAGE, PSR_DIGEST
from demist.runs import RunInfo, state_digest
from demist.training.latent_diffusion import (denoising_error, module_device, resolve_config,
                                              sample_noising)
from demist.training.latent_patches import LatentPatchSampler
from demist.training.loop import Phase, Stage, seed_everything, train, warmup_cosine
from demist.training.latent_stage import prepare_latent_stage, write_latent_run
from demist.training.run_output import barrier, data_fingerprint, training_record, weights_metadata

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
    if max_steps is not None:
        cfg = cfg.replace(backbone=dataclasses.replace(cfg.backbone, steps=max_steps))
    data = prepare_latent_stage(manifest, stage1_run, cfg, out, resume, subjects, device, backbone=None,
                                batch_size=cfg.backbone.batch_size, encode_condition=False)
    stage1, sessions, sampler, schedule = data.stage1, data.sessions, data.sampler, data.schedule

    seed_everything(cfg.train.seed)
    unet = build_unet(cfg.unet, cfg.autoencoder.latent_channels, use_flash_attention=True)
    logger.info("backbone: %d sessions, %.2f M parameters, prediction target %s, %d steps",
                len(sessions), sum(p.numel() for p in unet.parameters()) / 1e6, schedule.prediction_type,
                cfg.backbone.steps)
    eval_latents = torch.cat([b["z_y"] for b in sampler.evaluation_batches()])
    before = denoising_error(unet, eval_latents, schedule)
    stage = backbone_stage(cfg, unet, schedule, sampler)
    result = train(stage, out, cfg.train, device=device, resume=resume, tensorboard=tensorboard,
                   weights_metadata=weights_metadata(cfg, BACKBONE_STAGE, data_fingerprint(sessions, stage1.run)))
    run = None
    if result.is_main_process:
        after = denoising_error(unet.eval(), eval_latents.to(module_device(unet)), schedule)
        logger.info("backbone: denoising MSE (%s) on evaluation patches %.4g before, %.4g after training",
                    schedule.prediction_type, before["mean"], after["mean"])
        digest = {PSR_DIGEST: state_digest(stage1.psr_autoencoder.state_dict())}
        run = write_latent_run(out, data, method="demist", stage=BACKBONE_STAGE, components={"unet": unet.state_dict()},
                               training=training_record(result, sessions, manifest, subjects, latent_encoding="mu",
                                                        **digest),
                               metrics={"eval_denoising_mse_before": before, "eval_denoising_mse_after": after})
    barrier()
    return run
