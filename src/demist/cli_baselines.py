"""`demist train ridge|constant`: the linear floor and the constant predictor every deep model must beat."""

from __future__ import annotations

from pathlib import Path

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
