"""Trained networks back from their run directories: a Stage-1 run's autoencoders, a backbone (a backbone run, or a
MONAI bundle checkpoint) checked against the latent it must live in, and every network of a finished DEMIST or FT-LDM
run for inference. Training builds on these, and inference rebuilds with them, so both read runs the same way.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from demist.config import Config
from demist.errors import DemistError
from demist.models.autoencoder import autoencoder_from_state
from demist.models.backbone import build_unet, freeze, load_backbone_checkpoint, load_backbone_state_dict
from demist.models.demist_net import DemistNet
from demist.models.ftldm_net import ConcatConditionedUNet
from demist.runs import RUN_FILE, RunInfo, read_run, sha256_file, state_digest

logger = logging.getLogger(__name__)

BACKBONE_STAGE = "backbone"
DEMIST_STAGE = "demist"
FTLDM_STAGE = "ftldm"
BUNDLE_PREDICTION_TYPE = "epsilon"  # the MONAI brain-MRI LDM bundle predicts noise
#: Key of a backbone run's training record: the digest of the PSR autoencoder whose latent the UNet learned.
PSR_DIGEST = "psr_autoencoder_digest"


# --- Stage 1 and the backbone -------------------------------------------------------------------------------------


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


@dataclass
class FrozenBackbone:
    """The UNet to freeze, what it predicts, and where it came from (a backbone run, or a bundle file)."""

    unet: nn.Module
    prediction_type: str
    config: Config  # the Stage-2 config, with the prediction type of this backbone
    run: RunInfo | None = None
    bundle: dict[str, str] | None = None  # {"path", "sha256", "key_format"} of a bundle checkpoint


def stage1_bundle_init(stage1: RunInfo) -> str | None:
    """The bundle autoencoder file Stage 1's E_PSR was initialised from, or None (not initialised, or unknown)."""
    recorded = stage1.training.get("psr_init_bundle")
    if recorded:
        return str(recorded)
    parent = stage1.parents.get("psr_ae")  # the PSR autoencoder run records its --init-bundle
    if not parent or not (Path(parent["path"]) / RUN_FILE).is_file():
        return None
    if sha256_file(Path(parent["path"]) / RUN_FILE) != parent.get("sha256"):
        return None  # retrained since: its record says nothing about this Stage 1
    init = read_run(parent["path"], "autoencoder-psr", what=f"PSR autoencoder run of {stage1.path}").training
    return str(init["init_bundle"]) if init.get("init_bundle") else None


def load_frozen_backbone(backbone: str | Path, cfg: Config, stage1: Stage1Parts,
                         use_flash_attention: bool = True) -> FrozenBackbone:
    """The backbone of `--backbone` (a backbone run directory or a bundle checkpoint), checked against Stage 1."""
    path = Path(backbone)
    if path.is_dir():
        run, unet = load_backbone_run(path, use_flash_attention=use_flash_attention)
        if not lives_in_latent_of(run, stage1):
            raise DemistError(f"--backbone {path}: was pretrained in the latent of another PSR autoencoder (Stage-1 "
                              f"run {run.parents.get('stage1', {}).get('path')}); expected a backbone trained on "
                              f"--stage1 {stage1.run.path}, or on a Stage 1 with the same PSR autoencoder and scale")
        cfg.require_same(run.config, ("unet", "diffusion"), f"--backbone {path}")
        return FrozenBackbone(unet=unet, prediction_type=str(run.prediction_type), config=cfg, run=run)
    if path.is_file():
        if stage1_bundle_init(stage1.run) is None:
            raise DemistError(f"--backbone {path}: is a MONAI bundle checkpoint, but the PSR autoencoder of --stage1 "
                              f"{stage1.run.path} was not initialised from the bundle autoencoder (or no record says "
                              "so); expected a Stage-1 run trained with --init-bundle, or a `demist train backbone` "
                              "run")
        unet, report = load_backbone_checkpoint(path, cfg.unet, cfg.autoencoder.latent_channels, use_flash_attention)
        if cfg.diffusion.prediction_type != BUNDLE_PREDICTION_TYPE:
            logger.info("--backbone %s: a bundle UNet predicts %s; config diffusion.prediction_type %s replaced",
                        path, BUNDLE_PREDICTION_TYPE, cfg.diffusion.prediction_type)
            cfg = cfg.replace(diffusion=dataclasses.replace(cfg.diffusion, prediction_type=BUNDLE_PREDICTION_TYPE))
        bundle = {"path": str(path.resolve()), "sha256": sha256_file(path), "key_format": report.key_format}
        return FrozenBackbone(unet=unet, prediction_type=BUNDLE_PREDICTION_TYPE, config=cfg, bundle=bundle)
    raise DemistError(f"--backbone {path}: not found; expected a backbone run directory or a bundle checkpoint file")


# --- inference ---------------------------------------------------------------------------------------------------


@dataclass
class InferenceNetworks:
    """Everything a finished Stage-2 run needs to synthesize (CPU, eval mode, no gradients; LoRA not merged)."""

    net: nn.Module  # net(x_t, t, z_c): a DemistNet, or FT-LDM's ConcatConditionedUNet
    psr_autoencoder: nn.Module
    cond_autoencoder: nn.Module
    prediction_type: str
    latent_scale_factor: float


def unchanged_parent(run: RunInfo, role: str) -> Path:
    """The folder of a parent run, refused if it is gone or has changed since `run` was trained on it."""
    parent = run.parents.get(role)
    if parent is None:
        raise DemistError(f"--model {run.path}: run.json names no {role} run; expected a `demist train demist` or "
                          "`demist train ftldm` run")
    path = Path(parent["path"])
    if not (path / RUN_FILE).is_file():
        raise DemistError(f"--model {run.path}: its {role} run {path} is missing; expected it where training left it")
    if sha256_file(path / RUN_FILE) != parent.get("sha256"):
        raise DemistError(f"--model {run.path}: its {role} run {path} has changed since training; expected the run "
                          "the streams were trained with")
    return path


def _bundle_file(run: RunInfo) -> Path:
    bundle = run.training.get("backbone_bundle") or {}
    path = Path(bundle.get("path", ""))
    if not path.is_file():
        raise DemistError(f"--model {run.path}: its bundle backbone {path} is missing; expected the file it was "
                          "trained with at that path")
    if sha256_file(path) != bundle.get("sha256"):
        raise DemistError(f"--model {run.path}: the bundle backbone {path} differs from the file it was trained with "
                          "(sha256); expected the same checkpoint")
    return path


def build_inference_networks(run: RunInfo, use_flash_attention: bool = True) -> InferenceNetworks:
    """Rebuild a Stage-2 run: its Stage-1 autoencoders, its frozen backbone and its trained streams (or, for an
    FT-LDM run, its fine-tuned UNet)."""
    if run.stage == FTLDM_STAGE:
        return build_ftldm_networks(run, use_flash_attention)
    if run.stage != DEMIST_STAGE or run.prediction_type is None or run.latent_scale_factor is None:
        raise DemistError(f"--model {run.path}: is a {run.stage!r} run; expected a run of `demist train demist`")
    cfg = run.config
    stage1 = load_stage1(unchanged_parent(run, "stage1"), what=f"Stage-1 run of {run.path}")
    if "backbone" in run.parents:
        _, unet = load_backbone_run(unchanged_parent(run, "backbone"), f"backbone run of {run.path}",
                                    use_flash_attention)
    else:
        unet, _ = load_backbone_checkpoint(_bundle_file(run), cfg.unet, cfg.autoencoder.latent_channels,
                                           use_flash_attention)
    net = DemistNet(unet, cfg.demist, cfg.unet, cfg.autoencoder.latent_channels)
    net.load_trainable_state_dict(run.weights("streams"), source=f"{run.path}/streams.safetensors")
    cond = (freeze(autoencoder_from_state(cfg.autoencoder, run.weights("cond_autoencoder")))
            if "cond_autoencoder" in run.components else stage1.cond_autoencoder)
    return InferenceNetworks(net=freeze(net), psr_autoencoder=stage1.psr_autoencoder, cond_autoencoder=cond,
                             prediction_type=run.prediction_type, latent_scale_factor=float(run.latent_scale_factor))


def build_ftldm_networks(run: RunInfo, use_flash_attention: bool = True) -> InferenceNetworks:
    """Rebuild a finished FT-LDM run (its Stage-1 autoencoders and fine-tuned UNet) for inference."""
    if run.stage != FTLDM_STAGE or run.prediction_type is None or run.latent_scale_factor is None:
        raise DemistError(f"--model {run.path}: is a {run.stage!r} run without its prediction type or latent scale "
                          "factor; expected a run of `demist train ftldm`")
    cfg = run.config
    stage1 = load_stage1(unchanged_parent(run, "stage1"), what=f"Stage-1 run of {run.path}")
    net = ConcatConditionedUNet(cfg.unet, cfg.autoencoder.latent_channels, use_flash_attention)
    net.unet.load_state_dict(run.weights("unet"))
    return InferenceNetworks(net=freeze(net), psr_autoencoder=stage1.psr_autoencoder,
                             cond_autoencoder=stage1.cond_autoencoder, prediction_type=str(run.prediction_type),
                             latent_scale_factor=float(run.latent_scale_factor))
