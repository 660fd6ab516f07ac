"""`demist train backbone`, `demist train demist` and `demist train ftldm`: the latent diffusion stages on top of a
Stage-1 run.

Torch and MONAI are imported inside the commands, so `demist --help` stays fast.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import typer

from demist.cli.options import BACKBONE, CONFIG, DEVICE, MANIFEST, MAX_STEPS, OUT, RESUME, STAGE1, TENSORBOARD
from demist.config import STREAM_SWITCHES


def backbone_command(
    manifest: Path = MANIFEST,
    stage1: Path = STAGE1,
    config: str = CONFIG,
    out: Path = OUT,
    max_steps: Optional[int] = MAX_STEPS,
    device: str = DEVICE,
    resume: bool = RESUME,
    tensorboard: bool = TENSORBOARD,
) -> None:
    """Pretrain the unconditional latent UNet (the frozen backbone of DEMIST) in Stage 1's PSR latent.

    Use it when the MONAI bundle's UNet weights are not available; DEMIST then takes OUT as --backbone.
    """
    from demist.training.backbone import train_backbone

    run = train_backbone(manifest, stage1, config, out, max_steps=max_steps, device=device, resume=resume,
                         tensorboard=tensorboard)
    if run is not None:
        m = run.metrics
        typer.echo(f"backbone: {run.path} (predicts {run.prediction_type}; denoising MSE on evaluation patches "
                   f"{m['eval_denoising_mse_before']['mean']:.4g} -> {m['eval_denoising_mse_after']['mean']:.4g})")


def demist_command(
    manifest: Path = MANIFEST,
    stage1: Path = STAGE1,
    backbone: Path = BACKBONE,
    config: str = CONFIG,
    out: Path = OUT,
    max_steps: Optional[int] = MAX_STEPS,
    device: str = DEVICE,
    resume: bool = RESUME,
    tensorboard: bool = TENSORBOARD,
    **stream_flags: bool,  # no_<switch> for each stream of STREAM_SWITCHES (see _with_stream_flags)
) -> None:
    """Train DEMIST's conditioning streams around the frozen backbone (Stage 2); OUT is what `synthesize` takes."""
    from demist.training.stage2 import train_demist

    off = [switch for switch in STREAM_SWITCHES.values() if stream_flags.get(f"no_{switch}")]
    run = train_demist(manifest, stage1, backbone, config, out, max_steps=max_steps, device=device, resume=resume,
                       streams_off=off, tensorboard=tensorboard)
    if run is not None:
        m = run.metrics
        trainable = run.training["parameters"]["total"]["trainable"]
        typer.echo(f"{run.method}: {run.path} ({trainable:,} trained parameters; denoising MSE on evaluation patches "
                   f"{m['eval_denoising_mse_backbone']['mean']:.4g} for the backbone alone -> "
                   f"{m['eval_denoising_mse_after']['mean']:.4g} with the streams)")


def _with_stream_flags(command):
    """Give `command` one --no-<switch> ablation flag per stream of `STREAM_SWITCHES`, so that a new stream gets its
    flag from the config alone (typer reads the signature)."""
    signature = inspect.signature(command)
    fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    flags = [inspect.Parameter(f"no_{switch}", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                               default=typer.Option(False, f"--no-{switch}",
                                                    help=f"Ablation: no {stream} stream ({switch})."))
             for stream, switch in STREAM_SWITCHES.items()]
    command.__signature__ = signature.replace(parameters=[*fixed, *flags])
    return command


demist_command = _with_stream_flags(demist_command)


def ftldm_command(
    manifest: Path = MANIFEST,
    stage1: Path = STAGE1,
    backbone: Path = BACKBONE,
    config: str = CONFIG,
    out: Path = OUT,
    max_steps: Optional[int] = MAX_STEPS,
    device: str = DEVICE,
    resume: bool = RESUME,
    tensorboard: bool = TENSORBOARD,
) -> None:
    """Baseline FT-LDM: fine-tune the whole backbone with the condition latent concatenated to its input."""
    from demist.training.ftldm import train_ftldm

    run = train_ftldm(manifest, stage1, backbone, config, out, max_steps=max_steps, device=device, resume=resume,
                      tensorboard=tensorboard)
    if run is not None:
        m = run.metrics
        typer.echo(f"ftldm: {run.path} (denoising MSE on evaluation patches {m['eval_denoising_mse_backbone']['mean']:.4g}"
                   f" for the backbone -> {m['eval_denoising_mse_after']['mean']:.4g} fine-tuned)")
