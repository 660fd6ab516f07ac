"""`demist train <baseline>`: one command per baseline of the method registry (`demist.methods.BASELINES`).

Baselines that train in steps (KL-GAN, VQ-VAE, cWDM) take --max-steps, --device and --resume; the closed-form ones
(ridge, constant) are fitted in seconds on the CPU and take neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer

from demist.cli.options import CONFIG, DEVICE, MANIFEST, MAX_STEPS, OUT, RESUME
from demist.methods import METHODS, TrainJob


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
            max_steps: Optional[int] = MAX_STEPS,
            device: str = DEVICE,
            resume: bool = RESUME,
        ) -> None:
            from demist.config import load_config

            run(TrainJob(manifest, load_config(config), out, max_steps=max_steps, device=device, resume=resume))
    else:
        def command(manifest: Path = MANIFEST, config: str = CONFIG, out: Path = OUT) -> None:
            from demist.config import load_config

            run(TrainJob(manifest, load_config(config), out))

    command.__doc__ = method.summary
    return command
