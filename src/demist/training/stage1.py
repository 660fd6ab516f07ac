"""Stage 1: the PSR and condition autoencoders, then the alignment of the condition latent to the PSR latent.

Three trainings, each writing a run directory:

1. `train_autoencoder(modality="psr")`: E_PSR/D_PSR on PSR / psr_range (stage "autoencoder-psr");
2. `train_autoencoder(modality="cond")`: E_cond/D_cond on [T1w, FLAIR] (stage "autoencoder-cond");
3. `train_alignment`: E_PSR frozen, the condition encoder fine-tuned so that μ_c matches μ_y on paired patches (with
   `align.recon_weight` > 0, the paper's 1, it also keeps its reconstruction; `tiny`: 0); it measures the alignment
   error before and after, computes the latent scale factor (1 / std of μ_y over training patches) and writes the
   Stage-1 run (stage "stage1") holding both autoencoders, which every later stage takes as `--stage1`.

Autoencoder loss: L1 (+ L2) reconstruction weighted by the brain mask + λ_KL·KL + λ_edge·Sobel-edge
+ λ_adv·patch-adversarial (least squares, from `stage1.adv_start`; MONAI `PatchDiscriminator`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from demist.config import INPUT_SCALING_KEYS, Config
from demist.config_sections import TrainConfig
from demist.data.augmentation import random_bias_field
from demist.data.manifest import SessionRecord
from demist.data.patches import PatchSampler, load_sessions
from demist.data.preprocess import PreparedSession
from demist.errors import DemistError
from demist.models.autoencoder import (COND_CHANNELS, PSR_CHANNELS, autoencoder_from_state, build_autoencoder,
                                       load_bundle_autoencoder)
from demist.models.backbone import freeze
from demist.runs import RUN_FILE, RunInfo, read_run, write_run
from demist.training.loop import Phase, Stage, seed_everything, train, warmup_cosine
from demist.training.losses import (alignment_loss, edge_loss, kl_divergence, reconstruction_loss,
                                    voxel_weights)
from demist.training.run_output import barrier, check_out, data_fingerprint, training_record, weights_metadata

logger = logging.getLogger(__name__)

MODALITIES = {"psr": ("target", PSR_CHANNELS), "cond": ("cond", COND_CHANNELS)}  # batch key, image channels


# --- stage definitions -----------------------------------------------------------------------------------------


def build_discriminator(cfg: Config, channels: int) -> nn.Module:
    """MONAI's patch discriminator (instance norm: batch-size independent)."""
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(spatial_dims=3, channels=cfg.stage1.disc_channels, in_channels=channels,
                              out_channels=1, num_layers_d=cfg.stage1.disc_layers, norm="INSTANCE")


def autoencoder_terms(cfg: Config, autoencoder: nn.Module, image: torch.Tensor, brain: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reconstruction, KL and edge terms for one batch; returns (reconstruction, terms)."""
    s1 = cfg.stage1
    weights = voxel_weights(brain, s1.background_weight)
    recon, mu, sigma = autoencoder(image)
    return recon, {"recon": reconstruction_loss(recon, image, weights, s1.l1_weight, s1.l2_weight),
                   "kl": kl_divergence(mu, sigma), "edge": edge_loss(recon, image, weights)}


def schedule(cfg: Config, modality: str) -> tuple[int, int]:
    """(steps, adversarial start) of an autoencoder: the condition one switches its GAN on at the same fraction."""
    s1 = cfg.stage1
    if modality == "psr":
        return s1.steps, s1.adv_start
    return s1.cond_steps, round(s1.adv_start * s1.cond_steps / max(1, s1.steps))


def autoencoder_stage(cfg: Config, modality: str, autoencoder: nn.Module, discriminator: nn.Module,
                      sampler: PatchSampler) -> Stage:
    """Phases: the autoencoder (all terms) and, after the warm-up, the discriminator."""
    from monai.losses import PatchAdversarialLoss

    s1, key = cfg.stage1, MODALITIES[modality][0]
    steps, adv_start = schedule(cfg, modality)
    adversarial = PatchAdversarialLoss(criterion="least_squares")
    adv_on = lambda step: s1.adv_weight > 0 and step >= adv_start  # noqa: E731

    def ae_loss(m, batch, step, ctx):
        recon, terms = autoencoder_terms(cfg, m["autoencoder"], batch[key], batch["brain"])
        total = terms["recon"] + s1.kl_weight * terms["kl"] + s1.edge_weight * terms["edge"]
        if adv_on(step):
            logits = m["discriminator"](recon.float())[-1]
            terms["adv"] = adversarial(logits, target_is_real=True, for_discriminator=False)
            total = total + s1.adv_weight * terms["adv"]
            ctx["fake"] = recon.detach().float()
        return {"loss": total, **terms}

    def disc_loss(m, batch, step, ctx):
        real_logits, fake_logits = m["discriminator"](torch.cat([batch[key], ctx["fake"]]))[-1].chunk(2)
        return {"loss": 0.5 * (adversarial(real_logits, target_is_real=True, for_discriminator=True)
                               + adversarial(fake_logits, target_is_real=False, for_discriminator=True))}

    ae_opt = torch.optim.Adam(autoencoder.parameters(), lr=s1.learning_rate)
    disc_opt = torch.optim.Adam(discriminator.parameters(), lr=s1.learning_rate)
    return Stage(name=f"autoencoder-{modality}", modules={"autoencoder": autoencoder, "discriminator": discriminator},
                 phases=[Phase("autoencoder", ae_opt, ae_loss, warmup_cosine(ae_opt, steps)),
                         Phase("discriminator", disc_opt, disc_loss, active=adv_on)],
                 batch=sampler.batch, steps=steps)


def alignment_stage(cfg: Config, psr_autoencoder: nn.Module, cond_autoencoder: nn.Module,
                    sampler: PatchSampler) -> Stage:
    """E_PSR frozen; the condition autoencoder learns μ_c ≈ μ_y, keeping its reconstruction if `align.recon_weight`
    is positive (and its KL)."""
    freeze(psr_autoencoder)
    a, s1 = cfg.align, cfg.stage1

    def align_loss(m, batch, step, ctx):
        with torch.no_grad():
            mu_psr = m["psr_autoencoder"].encode(batch["target"])[0]
        if a.bias_field > 0:  # the target stays the true PSR's latent: z_c must not depend on the field
            batch = {**batch, "cond": random_bias_field(batch["cond"], a.bias_field)}  # seeded as every loss's RNG
        if a.recon_weight > 0:
            weights = voxel_weights(batch["brain"], s1.background_weight)
            recon, mu_cond, sigma = m["cond_autoencoder"](batch["cond"])
            terms = {"recon": reconstruction_loss(recon, batch["cond"], weights, s1.l1_weight, s1.l2_weight)}
        else:  # nothing needs the condition decoder: encode only (about half the cost of a step)
            mu_cond, sigma = m["cond_autoencoder"].encode(batch["cond"])
            terms = {"recon": torch.zeros((), device=mu_cond.device)}
        terms |= {"align": alignment_loss(mu_cond, mu_psr), "kl": kl_divergence(mu_cond, sigma)}
        total = terms["align"] + a.recon_weight * terms["recon"] + s1.kl_weight * terms["kl"]
        if a.image_weight > 0:  # the frozen decoder passes the gradient on to μ_c
            decoded = m["psr_autoencoder"].decode(mu_cond)
            weights = voxel_weights(batch["brain"], s1.background_weight)
            terms["image"] = reconstruction_loss(decoded, batch["target"], weights)
            total = total + a.image_weight * terms["image"]
        return {"loss": total, **terms}

    if a.recon_weight == 0:  # the decoder gets no gradient: freeze it (DDP would otherwise wait for its gradients)
        for part in (cond_autoencoder.decoder, cond_autoencoder.post_quant_conv):
            part.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in cond_autoencoder.parameters() if p.requires_grad], lr=a.learning_rate)
    return Stage(name="align", modules={"psr_autoencoder": psr_autoencoder, "cond_autoencoder": cond_autoencoder},
                 phases=[Phase("align", optimizer, align_loss, warmup_cosine(optimizer, a.steps))],
                 batch=sampler.batch, steps=a.steps)


def _autoencoder_training(cfg: Config) -> TrainConfig:
    """[train] with the autoencoder stages' own precision."""
    return dataclasses.replace(cfg.train, mixed_precision=cfg.stage1.mixed_precision)


# --- measurements on fixed evaluation patches ------------------------------------------------------------------


def _on(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(next(module.parameters()).device)


@torch.no_grad()
def latent_scale_factor(psr_autoencoder: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """1 / std of the PSR latent means μ_y over the patches (later stages diffuse μ_y × this factor)."""
    mus = torch.cat([psr_autoencoder.encode(_on(psr_autoencoder, b["target"]))[0].flatten().float() for b in batches])
    return float(1.0 / mus.std().clamp_min(1e-8))


@torch.no_grad()
def alignment_error(psr_autoencoder: nn.Module, cond_autoencoder: nn.Module,
                    batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean ‖μ_c − μ_y‖² over the patches, and the same relative to the variance of μ_y (0 = aligned)."""
    squared, variance = [], []
    for b in batches:
        mu_psr = psr_autoencoder.encode(_on(psr_autoencoder, b["target"]))[0].float()
        mu_cond = cond_autoencoder.encode(_on(cond_autoencoder, b["cond"]))[0].float()
        squared.append(((mu_cond - mu_psr) ** 2).mean())
        variance.append(mu_psr.var())
    mse = float(torch.stack(squared).mean())
    return {"mse": mse, "relative": mse / max(float(torch.stack(variance).mean()), 1e-12)}


@torch.no_grad()
def patch_psnr(autoencoder: nn.Module, batches: Sequence[dict[str, torch.Tensor]], key: str) -> float:
    """PSNR (data range 1) of the autoencoder's μ-reconstruction inside the brain over the patches."""
    errors = []
    for b in batches:
        image, brain = _on(autoencoder, b[key]), _on(autoencoder, b["brain"]) > 0.5
        recon = autoencoder.decode(autoencoder.encode(image)[0]).float()
        errors.append(((recon - image) ** 2)[brain.expand_as(image)])
    return float(-10.0 * torch.log10(torch.cat(errors).mean().clamp_min(1e-12)))


# --- the three trainings ---------------------------------------------------------------------------------------


Sessions = Sequence[SessionRecord] | Sequence[PreparedSession]


def _prepared(sessions: Sessions, cfg: Config, need_target: bool) -> list[PreparedSession]:
    """Manifest records are prepared here; already prepared sessions (`train_stage1` prepares once) pass through."""
    if all(isinstance(s, PreparedSession) for s in sessions):
        return list(sessions)
    return load_sessions(sessions, cfg.data, need_target=need_target)


def train_autoencoder(sessions: Sessions, cfg: Config, out: str | Path, modality: str, *,
                      init_bundle: str | Path | None = None, max_steps: int | None = None, device: str = "auto",
                      resume: bool = False, tensorboard: bool = False) -> RunInfo | None:
    """Train the PSR (`modality="psr"`) or condition (`"cond"`) autoencoder into the run directory `out`.

    Returns the run (None on the non-main processes of a multi-process launch).
    """
    if modality not in MODALITIES:
        raise DemistError(f"--modality {modality}: unknown; expected psr or cond")
    out, (key, channels) = Path(out), MODALITIES[modality]
    check_out(out, resume)
    if max_steps is not None:
        field = "steps" if modality == "psr" else "cond_steps"
        cfg = cfg.replace(stage1=dataclasses.replace(cfg.stage1, **{field: max_steps}))
    sessions = _prepared(sessions, cfg, need_target=modality == "psr")
    sampler = PatchSampler(sessions, cfg.autoencoder.patch_size, cfg.stage1.batch_size, cfg.train.seed,
                           need_target=modality == "psr")
    seed_everything(cfg.train.seed)
    autoencoder = build_autoencoder(cfg.autoencoder, channels)
    if init_bundle is not None:
        load_bundle_autoencoder(autoencoder, init_bundle)
    stage = autoencoder_stage(cfg, modality, autoencoder, build_discriminator(cfg, channels), sampler)
    result = train(stage, out, _autoencoder_training(cfg), device=device, resume=resume, tensorboard=tensorboard,
                   weights_metadata=weights_metadata(cfg, stage.name, data_fingerprint(sessions)))
    run = None
    if result.is_main_process:
        psnr = patch_psnr(autoencoder.eval(), sampler.evaluation_batches(), key)
        logger.info("%s: PSNR %.2f dB inside the brain on evaluation patches of the training sessions", stage.name,
                    psnr)
        run = write_run(out, method="demist", stage=stage.name, config=cfg,
                        components={"autoencoder": autoencoder.state_dict()},
                        training=training_record(result, sessions, init_bundle=str(init_bundle or "") or None),
                        metrics={"train_patch_psnr": psnr})
    barrier()
    return run


def load_autoencoder_run(path: str | Path, modality: str, what: str) -> tuple[RunInfo, nn.Module]:
    """A finished autoencoder run and its autoencoder (on the CPU, eval mode)."""
    run = read_run(path, f"autoencoder-{modality}", what=what)
    return run, autoencoder_from_state(run.config.autoencoder, run.weights("autoencoder")).eval()


def train_alignment(sessions: Sessions, psr_run: str | Path, cond_run: str | Path, out: str | Path, *,
                    cfg: Config | None = None, max_steps: int | None = None, device: str = "auto",
                    resume: bool = False, tensorboard: bool = False,
                    scale_factor: float | None = None) -> RunInfo | None:
    """Align the condition latent to the PSR latent and write the Stage-1 run (both autoencoders) into `out`.

    `cfg` defaults to the PSR autoencoder run's config; its [autoencoder] and [data] must match both runs.
    `scale_factor`: the latent scale to keep (that of a prior whose backbone lives in this PSR latent); by default it
    is measured on these sessions.
    """
    out = Path(out)
    check_out(out, resume)
    psr, psr_ae = load_autoencoder_run(psr_run, "psr", "--psr-ae")
    cond, cond_ae = load_autoencoder_run(cond_run, "cond", "--cond-ae")
    cfg = cfg or psr.config
    sections = ("autoencoder", "data")
    # the alignment retrains E_cond on cfg's scaling (config.INPUT_SCALING_KEYS)
    section = (psr.config.first_difference(cond.config, sections, ignore=INPUT_SCALING_KEYS)
               or cfg.first_difference(psr.config, sections, ignore=INPUT_SCALING_KEYS))
    if section is not None:
        raise DemistError(f"--psr-ae {psr.path} and --cond-ae {cond.path}: their [{section}] config sections "
                          "differ (from each other or from --config); expected autoencoders trained alike")
    if max_steps is not None:
        cfg = cfg.replace(align=dataclasses.replace(cfg.align, steps=max_steps))
    sessions = _prepared(sessions, cfg, need_target=True)
    sampler = PatchSampler(sessions, cfg.autoencoder.patch_size, cfg.align.batch_size, cfg.train.seed)
    eval_batches = sampler.evaluation_batches()
    before = alignment_error(psr_ae, cond_ae, eval_batches)
    scale = latent_scale_factor(psr_ae, eval_batches) if scale_factor is None else float(scale_factor)
    seed_everything(cfg.train.seed)
    stage = alignment_stage(cfg, psr_ae, cond_ae.train(), sampler)
    result = train(stage, out, _autoencoder_training(cfg), device=device, resume=resume, tensorboard=tensorboard,
                   weights_metadata=weights_metadata(cfg, "stage1", data_fingerprint(sessions, psr, cond)))
    run = None
    if result.is_main_process:
        after = alignment_error(psr_ae, cond_ae.eval(), eval_batches)
        logger.info("alignment error ‖μ_c − μ_y‖²: %.4g before, %.4g after (relative %.3f → %.3f); scale factor %.4g",
                    before["mse"], after["mse"], before["relative"], after["relative"], scale)
        run = write_run(out, method="demist", stage="stage1", config=cfg,
                        components={"psr_autoencoder": psr_ae.state_dict(), "cond_autoencoder": cond_ae.state_dict()},
                        parents={"psr_ae": psr, "cond_ae": cond}, latent_scale_factor=scale,
                        training=training_record(result, sessions, latent_encoding="mu",
                                                  psr_init_bundle=psr.training.get("init_bundle")),
                        metrics={"align_mse_before": before["mse"], "align_mse_after": after["mse"],
                                 "align_relative_before": before["relative"], "align_relative_after": after["relative"],
                                 "cond_patch_psnr": patch_psnr(cond_ae, eval_batches, "cond")})
    barrier()
    return run


def train_stage1(sessions: Sessions, cfg: Config, out_dir: str | Path, *,
                 init_bundle: str | Path | None = None, max_steps: int | None = None, device: str = "auto",
                 resume: bool = False, tensorboard: bool = False) -> RunInfo | None:
    """All of Stage 1 into `out_dir`/psr_ae, /cond_ae and /stage1 (with `resume`, finished parts are kept)."""
    out_dir = Path(out_dir)
    if max_steps is not None:  # one override for all three trainings, recorded in each run's config
        cfg = cfg.replace(stage1=dataclasses.replace(cfg.stage1, steps=max_steps, cond_steps=max_steps),
                          align=dataclasses.replace(cfg.align, steps=max_steps))
    common = dict(device=device, resume=resume, tensorboard=tensorboard)
    sessions = _prepared(sessions, cfg, need_target=True)
    for modality in ("psr", "cond"):
        sub = out_dir / f"{modality}_ae"
        if resume and (sub / RUN_FILE).exists():
            read_run(sub, f"autoencoder-{modality}")  # verified, kept
            logger.info("%s: finished already; kept", sub)
            continue
        train_autoencoder(sessions, cfg, sub, modality, init_bundle=init_bundle, **common)
    return train_alignment(sessions, out_dir / "psr_ae", out_dir / "cond_ae", out_dir / "stage1", cfg=cfg, **common)
