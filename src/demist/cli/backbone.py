"""`demist train backbone`: the unconditional latent UNet on top of a Stage-1 run (a shared run, not a method; the
methods' commands are generated in `cli/methods.py`).

Torch and MONAI are imported inside the command, so `demist --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from demist.cli.options import CONFIG, DEVICE, MANIFEST, MAX_STEPS, OUT, RESUME, STAGE1, TENSORBOARD


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
