"""`demist evaluate`: score folders of synthesized PSR maps against a manifest's true PSR."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import typer

from demist.errors import DemistError

DEFAULT_METHOD = "demist"
_METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def parse_prediction_dirs(values: List[str]) -> dict[str, Path]:
    """{method: folder} from `--pred-dir` values: `NAME=FOLDER`, or a bare `FOLDER` for the method "demist".

    A value that is an existing path is always a bare folder (so a folder named `lr=1e-3` works).
    """
    folders: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if Path(value).exists() or not sep or not _METHOD_NAME.fullmatch(name):
            name, folder = DEFAULT_METHOD, value
        if not folder:
            raise DemistError(f"--pred-dir {value!r}: no folder given; expected FOLDER or NAME=FOLDER")
        if name in folders:
            raise DemistError(f"--pred-dir {value!r}: method {name} given twice; expected one folder per method "
                              "(name the others: --pred-dir ridge=FOLDER)")
        folders[name] = Path(folder)
    if not folders:
        raise DemistError("--pred-dir: none given; expected at least one folder of predictions")
    return folders


def evaluate_command(
    manifest: Path = typer.Option(..., "--manifest", help="Manifest CSV whose sessions have psr and brain_mask."),
    pred: List[str] = typer.Option(
        ..., "--pred-dir", metavar="[NAME=]FOLDER",
        help="Predictions folder as written by `demist synthesize --manifest --out-dir` "
             "(<subject>/<session>/psr.nii.gz). A bare FOLDER is the method 'demist'; repeat as NAME=FOLDER to "
             "compare methods (e.g. --pred-dir ridge=preds/ridge).",
    ),
    out: Path = typer.Option(..., "--out", help="Folder for per_session.csv, summary.json, report.md and figures."),
    config: str = typer.Option(
        "tiny", "--config", metavar="tiny|paper|FILE",
        help="Preset (tiny, paper) or TOML file; supplies data.psr_range and evaluation.ring_mm/bootstrap.",
    ),
    psr_range: Optional[float] = typer.Option(
        None, "--psr-range",
        help="Fixed PSR range the metrics divide by (data range 1); default: the config's data.psr_range.",
    ),
) -> None:
    """Metrics inside the brain, lesion-vs-NAWM contrast against the true PSR (oracle), report and figures."""
    folders = parse_prediction_dirs(pred)
    if psr_range is not None and not 0 < psr_range < float("inf"):
        raise DemistError(f"--psr-range {psr_range:g}: expected a positive PSR value such as 0.25")

    from demist.config import load_config
    from demist.evaluation.evaluate import evaluate_predictions

    cfg = load_config(config)
    summary = evaluate_predictions(
        manifest, folders, out,
        psr_range=cfg.data.psr_range if psr_range is None else psr_range,
        ring_mm=cfg.evaluation.ring_mm,
        bootstrap=cfg.evaluation.bootstrap,
        skip_unreadable=True,
    )
    typer.echo((out / "report.md").read_text(encoding="utf-8"))
    typer.echo(f"evaluation written to {out}")
    unreadable = summary["counts"]["unreadable"]
    if unreadable:  # scored what it could, like a batch; the exit code tells a script that files were left out
        typer.echo(f"{sum(map(len, unreadable.values()))} file(s) not readable and left out (see the report)", err=True)
        raise typer.Exit(code=1)
