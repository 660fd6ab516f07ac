"""Training FT-LDM (the fine-tuned latent diffusion baseline) on the same Stage 1, backbone and latents as DEMIST.

The loss is DEMIST's diffusion term alone, ‖target − UNet([x_t, z_c], t)‖², over the whole UNet (see
`models.ftldm_net`); the steps and batch size are [demist]'s, the learning rate `baselines.ftldm_learning_rate`.
The run (stage "ftldm") keeps the fine-tuned UNet and names its Stage-1 and backbone parents; `demist synthesize`
samples it like DEMIST.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import torch

from demist.config import Config
from demist.diffusion.schedule import NoiseSchedule
from demist.models.from_runs import FTLDM_STAGE
from demist.models.ftldm_net import ConcatConditionedUNet
from demist.runs import RunInfo
from demist.training.latent_diffusion import (conditioned_denoising_error, resolve_config,
                                              sample_noising)
from demist.training.latent_patches import LatentPatchSampler
from demist.training.loop import Phase, Stage, seed_everything, train, warmup_cosine
from demist.training.latent_stage import prepare_latent_stage, write_latent_run
from demist.training.run_output import barrier, data_fingerprint, training_record, weights_metadata

logger = logging.getLogger(__name__)

STAGE = FTLDM_STAGE


def ftldm_stage(cfg: Config, net: ConcatConditionedUNet, schedule: NoiseSchedule, sampler: LatentPatchSampler) -> Stage:
    """One phase: the diffusion loss on latent patch pairs (z_y, z_c), every UNet parameter trained."""

    def diffusion_loss(m, batch, step, ctx):
        x_t, t, target = sample_noising(batch["z_y"].float(), schedule)
        prediction = m["net"](x_t, t, batch["z_c"].float())
        return {"loss": ((prediction.float() - target) ** 2).mean()}

    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.baselines.ftldm_learning_rate)
    steps = cfg.demist.steps
    return Stage(name=STAGE, modules={"net": net},
                 phases=[Phase("diffusion", optimizer, diffusion_loss, warmup_cosine(optimizer, steps))],
                 batch=sampler.batch, steps=steps)


def train_ftldm(manifest: str | Path, stage1_run: str | Path, backbone: str | Path, config: Config | str | Path,
                out: str | Path, max_steps: int | None = None, device: str = "auto", resume: bool = False,
                subjects: Sequence[str] | None = None, tensorboard: bool = False) -> RunInfo | None:
    """Fine-tune the backbone with the condition concatenated into the run directory `out` (method "ftldm").

    `backbone`: a `train_backbone` run directory or a MONAI bundle UNet checkpoint file, as for `train_demist`.
    Returns the run (None on the non-main processes of a multi-process launch).
    """
    out, cfg = Path(out), resolve_config(config)
    if max_steps is not None:
        cfg = cfg.replace(demist=dataclasses.replace(cfg.demist, steps=max_steps))
    data = prepare_latent_stage(manifest, stage1_run, cfg, out, resume, subjects, device, backbone=backbone,
                                batch_size=cfg.demist.batch_size, encode_condition=True)
    cfg, frozen, sessions, sampler, schedule = data.config, data.frozen, data.sessions, data.sampler, data.schedule

    seed_everything(cfg.train.seed)
    net = ConcatConditionedUNet.from_backbone(frozen.unet, cfg.unet, cfg.autoencoder.latent_channels,
                                              use_flash_attention=True).requires_grad_(True)
    parameters = sum(p.numel() for p in net.parameters())
    logger.info("ftldm: %d sessions, prediction target %s, %d steps, %s parameters, all trained", len(sessions),
                schedule.prediction_type, cfg.demist.steps, f"{parameters:,}")
    eval_batches = sampler.evaluation_batches()
    before = conditioned_denoising_error(net, eval_batches, schedule)
    metadata = weights_metadata(cfg, STAGE, data_fingerprint(sessions, data.stage1.run, frozen.run))
    result = train(ftldm_stage(cfg, net, schedule, sampler), out, cfg.train, device=device, resume=resume,
                   tensorboard=tensorboard, weights_metadata=metadata)
    run = None
    if result.is_main_process:
        after = conditioned_denoising_error(net.eval(), eval_batches, schedule)
        logger.info("ftldm: denoising MSE (%s) on evaluation patches %.4g for the backbone, %.4g fine-tuned",
                    schedule.prediction_type, before["mean"], after["mean"])
        training = training_record(result, sessions, manifest, subjects,
                                   parameters={"total": {"trainable": parameters, "frozen": 0}},
                                   backbone_bundle=frozen.bundle, latent_encoding="mu")
        run = write_latent_run(out, data, method="ftldm", stage=STAGE, components={"unet": net.unet.state_dict()},
                               training=training,
                               metrics={"eval_denoising_mse_backbone": before, "eval_denoising_mse_after": after})
    barrier()
    return run
