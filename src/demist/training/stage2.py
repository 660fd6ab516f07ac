"""Stage 2: the conditioning streams around the frozen backbone (`DemistNet`), trained in the PSR latent.

Per batch of paired latent patches: z_y = μ(E_PSR(y)) × s and z_c = μ(E_cond(x_c)) × s (s: Stage 1's latent scale
factor), cropped from whole sessions encoded once (`latent_patches`); both encoders are frozen unless
`demist.finetune_cond_encoder`, which encodes z_c from each image patch instead (so that E_cond gets gradients; its
latents then differ slightly from the whole-volume ones at inference); x_t = √ᾱ_t·z_y + √(1−ᾱ_t)·ε at a uniform t; then

    loss = ‖target − DemistNet(x_t, t, z_c)‖²   (target: ε, v or z_y — the backbone's prediction type; with an
                                                 image hint, "latent+image" or "+subpixel", it also sees the image)
         + λ_edge·‖∇D_PSR(ẑ_y / s) − ∇y‖₁   on every `edge_every`-th step (ẑ_y: the x0 the prediction implies)
         + λ_align·‖z_c − z_y‖²             only when E_cond is fine-tuned.

The backbone is a `demist train backbone` run (its prediction type) or a MONAI bundle checkpoint (ε-prediction; then
Stage 1's E_PSR must have been initialised from the bundle autoencoder, or the latents would not be the ones the
bundle UNet learned). It stays frozen: no gradient, no optimizer state, never written again. The run keeps only the
trained parts (component "streams"), and names its parents; `build_inference_networks` puts everything back together.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Collection, Iterable, Sequence

import torch
from torch import nn

from demist.config import Config
from demist.config_sections import STREAM_SWITCHES
from demist.diffusion.schedule import NoiseSchedule
from demist.errors import DemistError
from demist.models.autoencoder import downsampling_factor
from demist.models.demist_net import DemistNet
from demist.models.from_runs import DEMIST_STAGE
from demist.runs import RunInfo
from demist.training.latent_diffusion import (LatentEncoder, conditioned_denoising_error,
                                              resolve_config, sample_noising)
from demist.training.latent_patches import LatentPatchSampler
from demist.training.loop import Phase, Stage, seed_everything, train, warmup_cosine
from demist.training.losses import alignment_loss, edge_loss, voxel_weights
from demist.training.latent_stage import prepare_latent_stage, write_latent_run
from demist.training.run_output import barrier, data_fingerprint, training_record, weights_metadata
from demist.training.stage2_parts import TrainableStreams, method_name

logger = logging.getLogger(__name__)

STAGE = DEMIST_STAGE


def demist_stage(cfg: Config, streams: TrainableStreams, cond_encoder: LatentEncoder | None,
                 psr_autoencoder: nn.Module, scale_factor: float, schedule: NoiseSchedule,
                 sampler: LatentPatchSampler) -> Stage:
    """One phase training the streams (and E_cond when `cond_encoder` is given, i.e. fine-tuned) on the loss of the
    module docstring. Batches carry z_y (and z_c unless E_cond trains) as precomputed latents."""
    d = cfg.demist

    def streams_loss(m, batch, step, ctx):
        z_y = batch["z_y"].float()
        z_c = batch["z_c"].float() if cond_encoder is None else m["cond_encoder"](batch["cond"]).float()
        x_t, t, target = sample_noising(z_y, schedule, d.timestep_power, d.input_perturbation)
        prediction = m["streams"](x_t, t, z_c, batch.get("cond"))
        terms = {"diffusion": ((prediction.float() - target) ** 2).mean()}
        total = terms["diffusion"]
        if d.edge_weight > 0 and step % d.edge_every == 0:
            z0_hat, _ = schedule.predict_x0_eps(prediction, x_t, t)
            decoded = m["psr_autoencoder"].decode(z0_hat / scale_factor)  # frozen D_PSR; gradients reach the streams
            weights = voxel_weights(batch["brain"], cfg.stage1.background_weight)
            terms["edge"] = edge_loss(decoded, batch["target"], weights)
            total = total + d.edge_weight * terms["edge"]
        if cond_encoder is not None:
            terms["align"] = alignment_loss(z_c, z_y)
            total = total + d.align_weight * terms["align"]
        return {"loss": total, **terms}

    modules: dict[str, nn.Module] = {"streams": streams, "psr_autoencoder": psr_autoencoder}
    if cond_encoder is not None:
        modules["cond_encoder"] = cond_encoder
    optimizer = torch.optim.AdamW(stage2_parameter_groups(streams.net, modules.values(), d.learning_rate,
                                                          d.zero_init_lr_scale))
    return Stage(name=STAGE, modules=modules,
                 phases=[Phase("streams", optimizer, streams_loss, warmup_cosine(optimizer, d.steps))],
                 batch=sampler.batch, steps=d.steps, ema_decay=d.ema_decay)


def stage2_parameter_groups(net: DemistNet, modules: Iterable[nn.Module], learning_rate: float,
                            zero_init_lr_scale: float) -> list[dict[str, Any]]:
    """AdamW groups of everything that trains: the zero-initialised tensors of `net` at `learning_rate` ×
    `zero_init_lr_scale`, the rest at `learning_rate`. (Zero tensors must grow before the conditioning reaches the
    output; a larger step there shortens the phase in which the streams change nothing.)"""
    zero = {id(p) for p in net.zero_initialised_parameters()}
    params = {id(p): p for module in modules for p in module.parameters() if p.requires_grad}
    groups = [{"params": [p for i, p in params.items() if i not in zero], "lr": learning_rate, "name": "streams"},
              {"params": [p for i, p in params.items() if i in zero], "lr": learning_rate * zero_init_lr_scale,
               "name": "zero-initialised"}]
    return [g for g in groups if g["params"]]


def stage2_config(cfg: Config, max_steps: int | None, streams_off: Collection[str] = ()) -> Config:
    """The config with --max-steps applied and the streams named in `streams_off` (their switches, e.g. "lora")
    turned off; the others keep the config's value."""
    unknown = sorted(set(streams_off) - set(STREAM_SWITCHES.values()))
    if unknown:
        raise DemistError(f"streams_off: unknown {', '.join(unknown)}; expected some of "
                          f"{', '.join(STREAM_SWITCHES.values())}")
    flags = {switch: False for switch in streams_off}
    demist = dataclasses.replace(cfg.demist, **flags, **({"steps": max_steps} if max_steps is not None else {}))
    switches = STREAM_SWITCHES.values()
    if not any(getattr(demist, switch) for switch in switches):
        raise DemistError(f"{' '.join(f'--no-{s}' for s in switches)}: all streams are off, so nothing conditions the "
                          f"backbone; expected at least one of {', '.join(switches)}")
    factor = downsampling_factor(cfg.autoencoder)
    if demist.uses_image_hint and 2 ** (len(demist.hint_channels) - 1) != factor:
        raise DemistError(f"config key demist.hint_channels: {list(demist.hint_channels)} downsamples the image "
                          f"{2 ** (len(demist.hint_channels) - 1)}×; expected {factor}× like the autoencoder, i.e. "
                          f"{len(cfg.autoencoder.channels)} entries")
    if demist.edge_every < 1:
        raise DemistError(f"config key demist.edge_every: got {demist.edge_every}; expected an integer >= 1")
    return cfg.replace(demist=demist)


def train_demist(manifest: str | Path, stage1_run: str | Path, backbone: str | Path, config: Config | str | Path,
                 out: str | Path, max_steps: int | None = None, device: str = "auto", resume: bool = False,
                 subjects: Sequence[str] | None = None, streams_off: Collection[str] = (),
                 tensorboard: bool = False) -> RunInfo | None:
    """Train DEMIST's streams around a frozen backbone into the run directory `out` (stage "demist").

    `backbone`: a `train_backbone` run directory or a MONAI bundle UNet checkpoint file. `streams_off` names streams
    (by switch: crossattn, controlnet, lora) to turn off over the config's [demist] switches; the method is "demist"
    or, with streams off, "demist-no-<switch>...".
    Returns the run (None on the non-main processes of a multi-process launch).
    """
    out = Path(out)
    cfg = stage2_config(resolve_config(config), max_steps, streams_off)
    finetune = cfg.demist.finetune_cond_encoder
    # a frozen E_cond gives fixed latents, encoded once; a fine-tuned one encodes z_c from each image patch
    image_keys = ("target", "brain", "cond") if finetune or cfg.demist.uses_image_hint else ("target", "brain")
    data = prepare_latent_stage(manifest, stage1_run, cfg, out, resume, subjects, device, backbone=backbone,
                                batch_size=cfg.demist.batch_size, encode_condition=not finetune, image_keys=image_keys)
    cfg, stage1, frozen, sessions = data.config, data.stage1, data.frozen, data.sessions
    sampler, schedule = data.sampler, data.schedule

    seed_everything(cfg.train.seed)
    net = DemistNet(frozen.unet, cfg.demist, cfg.unet, cfg.autoencoder.latent_channels)
    counts = net.parameter_counts()
    method = method_name(net.streams)
    logger.info("%s: %d sessions, prediction target %s, %d steps; parameters (trainable/frozen) %s", method,
                len(sessions), schedule.prediction_type, cfg.demist.steps,
                ", ".join(f"{k} {v['trainable']:,}/{v['frozen']:,}" for k, v in counts.items()))
    cond_encoder = None
    if finetune:  # only what computes μ_c trains (the rest would get no gradient)
        cond_encoder = LatentEncoder(stage1.cond_autoencoder, stage1.scale_factor, cfg.autoencoder.patch_size)
        for part in (stage1.cond_autoencoder.encoder, stage1.cond_autoencoder.quant_conv_mu):
            part.requires_grad_(True)

    eval_batches = sampler.evaluation_batches()
    before = conditioned_denoising_error(net, eval_batches, schedule, cond_encoder)
    streams = TrainableStreams(net)
    stage = demist_stage(cfg, streams, cond_encoder, stage1.psr_autoencoder, stage1.scale_factor, schedule, sampler)
    result = train(stage, out, cfg.train, device=device, resume=resume, tensorboard=tensorboard,
                   weights_metadata=weights_metadata(cfg, STAGE, data_fingerprint(sessions, stage1.run, frozen.run)))
    run = None
    if result.is_main_process:
        after = conditioned_denoising_error(net, eval_batches, schedule, cond_encoder)
        logger.info("%s: denoising MSE (%s) on evaluation patches %.4g for the backbone alone, %.4g with the streams",
                    method, schedule.prediction_type, before["mean"], after["mean"])
        components = {"streams": net.trainable_state_dict()}
        if cfg.demist.finetune_cond_encoder:
            components["cond_autoencoder"] = stage1.cond_autoencoder.state_dict()
        training = training_record(result, sessions, manifest, subjects, streams=net.streams, parameters=counts,
                                   backbone_bundle=frozen.bundle, latent_encoding="mu")
        run = write_latent_run(out, data, method=method, stage=STAGE, components=components, training=training,
                               metrics={"eval_denoising_mse_backbone": before, "eval_denoising_mse_after": after})
    barrier()
    return run
