"""The `demist` command line.

Heavy libraries (torch, MONAI, nilearn) are imported inside the commands, so `demist --help` answers at once. A
`DemistError` (a user's mistake) becomes one line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from demist.errors import DemistError
from demist.methods import BASELINES, METHODS

app = typer.Typer(
    help="DEMIST: synthesize quantitative PSR myelin maps from T1w (MPRAGE) + FLAIR MRI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@app.command()
def phantom(
    out: Path = typer.Option(..., "--out", help="Folder to write the cohort into (created; must be new or empty)."),
    subjects: int = typer.Option(..., "--subjects", help="Number of subjects (about 2 MS patients per control)."),
    spacing: float = typer.Option(2.0, "--spacing", help="Voxel size in mm: 1 (paper) or 2 (tiny)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives identical files."),
) -> None:
    """Generate the embedded synthetic MS cohort (T1w, FLAIR, PSR, masks, metadata) and its manifest."""
    from demist.data.phantom import generate_cohort
    from demist.data.summary import cohort_summary

    manifest = generate_cohort(out, subjects, spacing=spacing, seed=seed, progress=True)
    typer.echo(cohort_summary(manifest))
    typer.echo(f"manifest: {manifest}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for the cohort, runs, predictions and report."),
    subjects: int = typer.Option(14, "--subjects", help="Synthetic subjects to generate."),
    held_out: int = typer.Option(3, "--held-out", help="Subjects kept out of training, for evaluation."),
    seed: int = typer.Option(0, "--seed", help="Seed of the cohort and of the split."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1,
                                            help="Cap every training stage (a quick smoke run; numbers meaningless)."),
    mean_samples: int = typer.Option(3, "--mean-samples", min=0,
                                     help="Samples averaged in the report's demist-meanK row (0 or 1: no such row)."),
    prior: str = typer.Option("embedded", "--prior", help="embedded (autoencoders and backbone from the prior "
                              "shipped with demist), none (train them on the cohort) or a prior directory."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """The end-to-end demo: cohort, Stage 1, backbone, DEMIST, ridge floor, synthesis, evaluation, report.md."""
    from demist.demo import DemoPlan, run_demo

    report = run_demo(DemoPlan(out=out, subjects=subjects, held_out=held_out, seed=seed, max_steps=max_steps,
                               mean_samples=mean_samples, prior=prior), device=device)
    typer.echo(f"report: {report}")


@app.command()
def cv(
    manifest: Path = typer.Option(..., "--manifest", help="Manifest of the cohort (sessions with PSR and masks)."),
    out: Path = typer.Option(..., "--out", help="Folder for splits, per-fold runs, predictions and tables."),
    methods: str = typer.Option("demist,ridge", "--methods", help=f"Comma-separated: {', '.join(METHODS)}."),
    folds: int = typer.Option(5, "--folds", min=2, help="Subject-grouped folds."),
    config: str = typer.Option("tiny", "--config", help="Preset (tiny, paper) or a TOML file naming its base."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split (saved in splits.json)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Cap every training stage."),
    prior: str = typer.Option("none", "--prior", help="none (each fold trains Stage 1 and the backbone), embedded "
                              "or a prior directory (each fold aligns E_cond on the prior's autoencoders and "
                              "freezes the prior's backbone)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Cross-validate methods with subject-grouped folds; Table-1-like mean ± SD and paired t-tests."""
    from demist.config import load_config
    from demist.cv import run_cv
    from demist.methods import parse_methods

    table = run_cv(manifest, out, parse_methods(methods), load_config(config), folds=folds, seed=seed,
                   max_steps=max_steps, device=device, prior=prior)
    typer.echo(table.read_text())


def _mount_subcommands() -> None:
    """Attach the commands that live in their own modules (each imports only typer at module level)."""
    from demist.cli_baselines import baseline_command
    from demist.cli_evaluate import evaluate_command
    from demist.cli_stage2 import backbone_command, demist_command, ftldm_command
    from demist.cli_synthesize import synthesize_command
    from demist.cli_train import train_app

    app.command("synthesize")(synthesize_command)
    app.command("evaluate")(evaluate_command)
    train_app.command("backbone")(backbone_command)
    train_app.command("demist")(demist_command)
    train_app.command("ftldm")(ftldm_command)
    for name in BASELINES:
        train_app.command(name)(baseline_command(name))
    app.add_typer(train_app, name="train", help="Train Stage 1, the backbone, DEMIST or a baseline.")


def main() -> None:
    """Entry point: run the app, turning a user's mistake into one line and a non-zero exit."""
    _mount_subcommands()
    try:
        app()  # standalone: usage errors print click's message and exit 2 by themselves
    except DemistError as exc:
        typer.echo(f"demist: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("demist: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
