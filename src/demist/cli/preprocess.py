"""`demist preprocess`: raw scanner NIfTI → bias-corrected T1w, registered FLAIR, brain mask and a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from demist.cli.options import DEVICE
from demist.errors import DemistError


def preprocess_command(
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Folder for the preprocessed session(s) and "
                                           "manifest.csv (with --bids: DIR/derivatives/demist)."),
    t1w: Optional[Path] = typer.Option(None, "--t1w", help="Raw T1w (MPRAGE) NIfTI, whole head."),
    flair: Optional[Path] = typer.Option(None, "--flair", help="Raw FLAIR NIfTI, on its own grid."),
    subject: str = typer.Option("sub-01", "--subject", help="Single session: its subject label in manifest.csv."),
    session: str = typer.Option("ses-01", "--session", help="Single session: its session label in manifest.csv."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Batch form: every session of a manifest."),
    bids: Optional[Path] = typer.Option(None, "--bids", help="Batch form: every session of a BIDS dataset with a "
                                        "T1w and a FLAIR (several runs: the highest run number is used)."),
    device: str = DEVICE,
) -> None:
    """Bias correction (N4), brain extraction (deepbet) and FLAIR → T1w rigid registration (ANTs), on the T1w's
    native grid. Writes what `demist synthesize --manifest OUT/manifest.csv` takes as it is."""
    single = t1w is not None or flair is not None
    forms = [name for name, given in (("--t1w/--flair", single), ("--manifest", manifest is not None),
                                      ("--bids", bids is not None)) if given]
    if len(forms) != 1:
        raise DemistError(f"got {' and '.join(forms) or 'no input'}; expected one form: --t1w and --flair for one "
                          "session, or --manifest, or --bids for a batch")
    if single and (t1w is None or flair is None):
        given = "--t1w" if flair is None else "--flair"
        raise DemistError(f"one session needs both --t1w and --flair; got only {given}")
    if single:  # before any work: they name the session's folders in the manifest this writes
        from demist.data.manifest import check_folder_name

        check_folder_name(subject, "--subject")
        check_folder_name(session, "--session")
    if (bids is None) == (out_dir is None):
        raise DemistError(("--out-dir: missing; it is needed with --t1w/--flair and --manifest" if bids is None else
                           "--out-dir: not with --bids, which writes DIR/derivatives/demist"))
    from demist.atomic import check_output_folder
    from demist.devices import resolve_device
    from demist.preprocessing.tools import require_all

    if out_dir is not None:
        check_output_folder(out_dir, "--out-dir")
    require_all()  # before any output: say which extra is missing
    device_name = str(resolve_device(device))
    if manifest is not None or bids is not None:
        from demist.preprocessing.batch import preprocess_bids, preprocess_manifest

        summary, written = (preprocess_manifest(manifest, out_dir, device=device_name) if manifest is not None
                            else preprocess_bids(bids, device=device_name))
        typer.echo(str(summary))
        typer.echo(f"manifest: {written}")
        if summary.failed:
            raise typer.Exit(code=1)
        return

    from demist.data.manifest import MANIFEST_NAME, SessionRecord
    from demist.preprocessing.batch import write_session_manifest
    from demist.preprocessing.session import SessionFiles, preprocess_session

    for path, what in ((t1w, "--t1w"), (flair, "--flair")):
        if not path.is_file():
            problem = "is a directory" if path.is_dir() else "file not found"
            raise DemistError(f"{what} {path}: {problem}; expected a NIfTI image (.nii or .nii.gz)")
    files = SessionFiles.in_folder(out_dir)
    if any(p.exists() for p in files.all):
        raise DemistError(f"--out-dir {out_dir}: already holds a preprocessed session; expected a new or empty folder")
    preprocess_session(t1w, flair, files, device=device_name, key=f"{subject}/{session}")
    record = SessionRecord(subject=subject, session=session, group="unknown", t1w=t1w.resolve(), flair=flair.resolve())
    written = write_session_manifest(out_dir / MANIFEST_NAME, [(record, files)])
    for path in files.all:
        typer.echo(f"wrote {path}")
    typer.echo(f"manifest: {written}")
