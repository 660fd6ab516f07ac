"""The `demist` command line.

Heavy libraries (torch, MONAI, nilearn) are imported inside the commands, so `demist --help` answers at once. A
`DemistError` (a user's mistake) becomes one line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import logging
import sys

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


def _mount_subcommands() -> None:
    """Register every command, all the same way (each module imports only typer and light modules at its top)."""
    from demist.cli import train, workflows
    from demist.cli.backbone import backbone_command
    from demist.cli.distill import distill_command
    from demist.cli.evaluate import evaluate_command
    from demist.cli.methods import COMMANDS, train_command
    from demist.cli.preprocess import preprocess_command
    from demist.cli.synthesize import synthesize_command

    top = {"phantom": workflows.phantom, "preprocess": preprocess_command,
           "synthesize": synthesize_command, "evaluate": evaluate_command,
           "demo": workflows.demo, "cv": workflows.cv}
    training = {"autoencoder": train.autoencoder, "align": train.align, "stage1": train.stage1,
                "prior": train.prior_command, "backbone": backbone_command, "distill": distill_command,
                **{name: train_command(name) for name in COMMANDS}}
    for name, command in top.items():
        app.command(name)(command)
    for name, command in training.items():
        train.train_app.command(name)(command)
    app.add_typer(train.train_app, name="train",
                  help="Train Stage 1, the backbone, DEMIST, its distilled student or a baseline.")


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
