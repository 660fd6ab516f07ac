"""The options the `demist` commands share, each defined once."""

from __future__ import annotations

import typer

MANIFEST = typer.Option(..., "--manifest", help="Manifest CSV of the training sessions (columns t1w, flair, psr, …).")
CONFIG = typer.Option("tiny", "--config", help="Preset (tiny, paper) or a TOML file naming its base preset.")
OUT = typer.Option(..., "--out", help="Run directory to write (new, or an interrupted one with --resume).")
FIT_OUT = typer.Option(..., "--out", help="Run directory to write (new or empty; a closed-form fit has no --resume).")
STAGE1 = typer.Option(..., "--stage1", help="Stage-1 run directory (DIR/stage1 of `demist train stage1`).")
BACKBONE = typer.Option(..., "--backbone",
                        help="The backbone: a `demist train backbone` run directory, or the MONAI bundle's UNet "
                             "checkpoint (.pt; needs a Stage 1 trained with --init-bundle).")
MAX_STEPS = typer.Option(None, "--max-steps", min=1, help="Train this many steps instead of the config's.")


def _check_device(device: str) -> str:
    """Refuse an unknown or absent device when the options are read, before any input is loaded or output written."""
    from demist.devices import resolve_device

    resolve_device(device)
    return device


DEVICE = typer.Option("auto", "--device", help="auto (a GPU when there is one), cpu or cuda.", callback=_check_device)
RESUME = typer.Option(False, "--resume", help="Continue from the last checkpoint in the output directory.")
TENSORBOARD = typer.Option(False, "--tensorboard", help="Also log to OUT/tensorboard (needs the tensorboard package).")

