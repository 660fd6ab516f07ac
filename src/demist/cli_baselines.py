"""`demist train ridge|constant`: the linear floor and the constant predictor every deep model must beat."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

MANIFEST = typer.Option(..., "--manifest", help="Manifest CSV of the training sessions (with psr).")
CONFIG = typer.Option("tiny", "--config", help="Preset (tiny, paper) or a TOML file naming its base preset.")
OUT = typer.Option(..., "--out", help="Run directory to write.")


def ridge_command(manifest: Path = MANIFEST, config: str = CONFIG, out: Path = OUT) -> None:
    """Voxelwise ridge regression on T1w, FLAIR and smoothed copies (the floor of every deep model)."""
    from demist.baselines.ridge import train_ridge
    from demist.config import load_config

    model = train_ridge(manifest, load_config(config), out)
    typer.echo(f"ridge: {out} (training R² {model.training.get('r2_train', float('nan')):.3f})")


def constant_command(manifest: Path = MANIFEST, config: str = CONFIG, out: Path = OUT) -> None:
    """The training set's mean PSR everywhere in the brain."""
    from demist.baselines.constant import train_constant
    from demist.config import load_config

    train_constant(manifest, load_config(config), out)
    typer.echo(f"constant: {out}")


def deep_baseline_command(method: str, summary: str):
    """A `demist train <method>` command for a deep translation baseline (klgan, vqvae, cwdm)."""

    def command(
        manifest: Path = MANIFEST,
        config: str = CONFIG,
        out: Path = OUT,
        max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Train this many steps."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
    ) -> None:
        import importlib

        from demist.config import load_config

        train = getattr(importlib.import_module(f"demist.baselines.{method}"), f"train_{method}")
        train(manifest, load_config(config), out, max_steps=max_steps, device=device, resume=resume)
        typer.echo(f"{method}: {out}")

    command.__doc__ = summary
    return command


DEEP_BASELINE_COMMANDS = {
    "klgan": "KL-GAN: an AutoencoderKL-style network translating T1w+FLAIR to PSR (L1 + KL + patch adversarial).",
    "vqvae": "VQ-VAE: MONAI VQVAE translating T1w+FLAIR to PSR through a quantised latent.",
    "cwdm": "cWDM: conditional wavelet diffusion (3D Haar sub-bands, x0-predicting UNet).",
}
