"""The pieces of Stage 2 around `DemistNet`: the frozen backbone's source, the trainable view the loop checkpoints,
ablation names, and rebuilding a finished Stage-2 run (with its parents) for inference.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from demist.config import Config
from demist.errors import DemistError
from demist.models.autoencoder import autoencoder_from_state
from demist.models.backbone import freeze, load_backbone_checkpoint
from demist.models.demist_net import STREAMS, DemistNet
from demist.runs import RUN_FILE, RunInfo, read_run, sha256_file
from demist.training.backbone import Stage1Parts, lives_in_latent_of, load_backbone_run, load_stage1

logger = logging.getLogger(__name__)

BUNDLE_PREDICTION_TYPE = "epsilon"  # the MONAI brain-MRI LDM bundle predicts noise
STREAM_FLAGS = {"semantic": "crossattn", "spatial": "controlnet", "adaptive": "lora"}  # DemistNet stream -> flag


def method_name(streams: Mapping[str, bool]) -> str:
    """"demist" with every stream on; otherwise "demist-no-<flag>" for each stream that is off."""
    return "demist" + "".join(f"-no-{STREAM_FLAGS[s]}" for s in STREAMS if not streams[s])


class TrainableStreams(nn.Module):
    """DemistNet as the training loop sees it: the same forward, but `state_dict` / `load_state_dict` hold only the
    trained parts, so checkpoints never copy the frozen backbone (it stays in its own file)."""

    def __init__(self, net: DemistNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z_c: torch.Tensor,
                image: torch.Tensor | None = None) -> torch.Tensor:
        """`image`: the T1w + FLAIR patch under the latent patch, for a net whose ControlNet also sees the image."""
        return self.net(x_t, t, z_c, self.net.embed_image(image) if self.net.uses_image else None)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.net.trainable_state_dict()

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                        assign: bool = False):  # type: ignore[override]
        self.net.load_trainable_state_dict(state_dict, source="training checkpoint")
        return torch.nn.modules.module._IncompatibleKeys([], [])


# --- the frozen backbone -------------------------------------------------------------------------------------------


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
                              f"{stage1.run.path} was not initialised from the bundle autoencoder (or no record says so); "
                              "expected a Stage-1 run trained with --init-bundle, or a `demist train backbone` run")
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
    if run.stage == "ftldm":
        from demist.training.ftldm import build_ftldm_networks

        return build_ftldm_networks(run, use_flash_attention)
    if run.stage != "demist" or run.prediction_type is None or run.latent_scale_factor is None:
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
