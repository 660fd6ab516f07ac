"""The `demist` command line.

Heavy libraries (torch, MONAI, nilearn) are imported inside the commands, so `demist --help` answers at once. A
`DemistError` (a user's mistake) becomes one line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from demist.errors import DemistError

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


def _mount_subcommands() -> None:
    """Attach the commands that live in their own modules (each imports only typer at module level)."""
    from demist.cli_baselines import constant_command, ridge_command
    from demist.cli_synthesize import synthesize_command
    from demist.cli_train import train_app

    app.command("synthesize")(synthesize_command)
    train_app.command("ridge")(ridge_command)
    train_app.command("constant")(constant_command)
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
