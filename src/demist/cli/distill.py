"""`demist train distill`: a few-step student of a trained DEMIST run (a run built on another run, not a method).

Torch and MONAI are imported inside the command, so `demist --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from demist.cli.options import DEVICE, MAX_STEPS, OUT, RESUME, TENSORBOARD


def distill_command(
    teacher: Path = typer.Option(..., "--teacher", help="The DEMIST run to distil (`demist train demist`)."),
    out: Path = OUT,
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Sessions to distil on (default: the manifest "
                                            "the teacher was trained on; always the teacher's training subjects)."),
    student_steps: Optional[int] = typer.Option(None, "--student-steps", min=1, help="DDIM steps the student takes "
                                                "(default: the config's distill.student_steps); they must be among "
                                                "the teacher's sampler timesteps."),
    max_steps: Optional[int] = MAX_STEPS,
    device: str = DEVICE,
    resume: bool = RESUME,
    tensorboard: bool = TENSORBOARD,
) -> None:
    """Distil a DEMIST run into a student that samples in a few DDIM steps what the teacher samples with its own
    sampler; `demist synthesize --model OUT` then uses the student's steps."""
    from demist.training.distill import train_distill

    run = train_distill(teacher, out, manifest=manifest, student_steps=student_steps, max_steps=max_steps,
                        device=device, resume=resume, tensorboard=tensorboard)
    if run is not None:
        m, s = run.metrics, run.config.sampling
        typer.echo(f"distill: {run.path} samples with {s.sampler}-{s.steps} (teacher "
                   f"{run.training['teacher_sampler']}); latent MSE of its samples to the teacher's "
                   f"{m['sample_mse_to_teacher_before']:.4g} -> {m['sample_mse_to_teacher_after']:.4g}")
