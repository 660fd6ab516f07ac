"""`demist train <baseline>`: one command per baseline of the method registry (`demist.methods.BASELINES`).

Baselines that train in steps (KL-GAN, VQ-VAE, cWDM) take --max-steps, --device and --resume; the closed-form ones
(ridge, constant) are fitted in seconds on the CPU and take neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer

from demist.methods import METHODS, TrainJob

MANIFEST = typer.Option(..., "--manifest", help="Manifest CSV of the training sessions (with psr).")
CONFIG = typer.Option("tiny", "--config", help="Preset (tiny, paper) or a TOML file naming its base preset.")
OUT = typer.Option(..., "--out", help="Run directory to write.")


def baseline_command(name: str) -> Callable[..., None]:
    """The `demist train <name>` command of a registered baseline."""
    method = METHODS[name]

    def run(job: TrainJob) -> None:
        method.train(job)
        typer.echo(f"{name}: {job.out}")

    if method.iterative:
        def command(
            manifest: Path = MANIFEST,
            config: str = CONFIG,
            out: Path = OUT,
            max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Train this many steps."),
            device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
            resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
        ) -> None:
            from demist.config import load_config

            run(TrainJob(manifest, load_config(config), out, max_steps=max_steps, device=device, resume=resume))
    else:
        def command(manifest: Path = MANIFEST, config: str = CONFIG, out: Path = OUT) -> None:
            from demist.config import load_config

            run(TrainJob(manifest, load_config(config), out))

    command.__doc__ = method.summary
    return command
