"""`demist synthesize`: PSR maps for scans that never had qMT, one pair or a whole manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from demist.cli.options import DEVICE
from demist.errors import DemistError

DEFAULT_HELP = (
    "Sampler and steps default to the model's config (tiny: DPM-Solver++, 10 steps, which is as close to the "
    "DDPM-1000 sample as DDIM-20; see docs/inference.md)."
)


def synthesize_command(
    model: Path = typer.Option(..., "--model", help="A run that synthesizes: of `demist train demist` (or an "
                               "ablation), `demist train distill`, FT-LDM or another baseline."),
    t1w: Optional[Path] = typer.Option(None, "--t1w", help="T1w (MPRAGE) NIfTI, skull-stripped or with --mask."),
    flair: Optional[Path] = typer.Option(None, "--flair", help="FLAIR NIfTI (any grid covering the same anatomy)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output PSR NIfTI (on the T1w's grid)."),
    mask: Optional[Path] = typer.Option(None, "--mask",
                                        help="Brain mask; needed when the inputs are not skull-stripped."),
    manifest: Optional[Path] = typer.Option(None, "--manifest",
                                            help="Batch form: synthesize every session of a manifest."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir",
                                           help="Batch form: writes OUT/<subject>/<session>/psr.nii.gz."),
    bids: Optional[Path] = typer.Option(None, "--bids", help="BIDS form: every session `demist preprocess --bids` "
                                        "prepared, written as DIR/derivatives/demist/.../*_desc-demist_PSRmap.nii.gz "
                                        "with a JSON sidecar."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="ddim, dpm++ or ddpm. " + DEFAULT_HELP),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (ddpm always uses all of them)."),
    start_strength: Optional[float] = typer.Option(
        None, "--start-strength", help="DEMIST/FT-LDM: 1 starts sampling from pure noise (the paper); s < 1 from the "
        "aligned condition latent noised to s·T (SDEdit). Default: the model's config (1)."),
    anchor_sigma: Optional[float] = typer.Option(
        None, "--anchor-sigma", help="DEMIST/FT-LDM: 0 is the paper's sampler; σ > 0 keeps the low-pass (σ latent "
        "voxels) of every step's x0 estimate at the first step's, the network's conditional mean. Default: the "
        "model's config (0)."),
    max_memory: Optional[float] = typer.Option(
        None, "--max-memory", help="DEMIST/FT-LDM: GiB one synthesis may use (default 4). Bounds the autoencoder "
        "windows where the model allows it (channel norm: in one piece when it fits); the UNet always runs at its "
        "training tile, and a budget below what that needs is refused."),
    precision: Optional[str] = typer.Option(None, "--precision", help="DEMIST/FT-LDM: auto (the default: bf16 where "
                                            "the hardware has it) or fp32 (the reference path, for checks)."),
    samples: int = typer.Option(1, "--samples", help="Samples to average; >1 also writes <name>_std.nii.gz."),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed: the same seed gives the same map."),
    device: str = DEVICE,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    preprocess: bool = typer.Option(False, "--preprocess", help="The inputs are raw scans: run `demist preprocess`'s "
                                    "steps first (one scan: in a temporary folder; a manifest: into "
                                    "OUT/preprocessed, kept and resumable)."),
) -> None:
    """Synthesize a PSR map (PSR units, the T1w's native grid) from T1w + FLAIR."""
    single = [t1w, flair, output]
    if bids is not None:
        if manifest is not None or out_dir is not None or any(v is not None for v in single):
            raise DemistError("BIDS form: give --bids alone, with none of --manifest/--out-dir/--t1w/--flair/-o")
    elif manifest is not None or out_dir is not None:
        if manifest is None or out_dir is None or any(v is not None for v in single):
            raise DemistError("batch form: give --manifest and --out-dir, and none of --t1w/--flair/-o")
    elif any(v is None for v in single):
        missing = ", ".join(name for name, v in zip(("--t1w", "--flair", "-o"), single) if v is None)
        raise DemistError(f"missing {missing}: give --t1w, --flair and -o for one scan, or --manifest and --out-dir "
                          "for a batch")
    if (bids is not None or manifest is not None) and (overwrite or mask is not None):
        raise DemistError("--overwrite/--mask: only for one scan (-o). A batch never replaces a finished session "
                          "(give a new --out-dir, or delete a session's psr.nii.gz to redo it) and takes each "
                          "session's mask from the manifest's brain_mask column")
    if samples < 1:
        raise DemistError(f"--samples {samples}: expected 1 or more")
    if steps is not None and steps < 1:
        raise DemistError(f"--steps {steps}: expected 1 or more")
    from demist.inference.demist_synthesizer import check_sampling_options

    check_sampling_options(sampler, start_strength, anchor_sigma, max_memory, precision)  # whatever the model

    from demist.atomic import check_output_folder
    from demist.inference.pipeline import check_output_path, synthesize_files
    from demist.methods import load_synthesizer

    if output is not None:
        check_output_path(output, overwrite, inputs=(t1w, flair, mask))  # before the model is loaded: fail fast
    if out_dir is not None:
        check_output_folder(out_dir, "--out-dir")
    if preprocess and (bids is not None or mask is not None):
        raise DemistError("--preprocess: not with --bids (run `demist preprocess --bids` first) nor --mask (it "
                          "extracts the brain itself)")
    if preprocess:
        from demist.preprocessing.tools import require_all

        require_all()  # before the model is loaded: say which extra is missing
    if bids is not None:
        _bids_manifest(bids)  # before the model is loaded: fail fast
    synthesizer = load_synthesizer(model, sampler=sampler, steps=steps, device=device, start_strength=start_strength,
                                   max_memory=max_memory, precision=precision, anchor_sigma=anchor_sigma)
    if bids is not None:
        _synthesize_bids(synthesizer, model, bids, samples, seed)
        return
    if manifest is not None:  # under `accelerate launch` / `torchrun`, each process takes its share
        from demist.inference.batch import synthesize_manifest_distributed

        from accelerate import PartialState

        from demist.data.manifest import MANIFEST_NAME
        from demist.devices import resolve_device

        cpu = resolve_device(device).type == "cpu"
        state = PartialState(cpu=cpu)
        unprepared = 0  # sessions whose preprocessing failed: not synthesized, and the batch exits 1
        if preprocess:  # by the main process alone (N processes would each redo every session); the rest wait
            if state.is_main_process:
                unprepared = _preprocess_batch(manifest, out_dir / "preprocessed", str(resolve_device(device)))
            state.wait_for_everyone()
            manifest = out_dir / "preprocessed" / MANIFEST_NAME
        summary = synthesize_manifest_distributed(synthesizer, manifest, out_dir, samples=samples, seed=seed, cpu=cpu)
        if state.is_main_process:
            typer.echo(str(summary))
        if summary.failed or unprepared:
            raise typer.Exit(code=1)
        return
    if preprocess:
        written = _synthesize_raw(synthesizer, t1w, flair, output, samples, seed, overwrite, device)
    else:
        written = synthesize_files(synthesizer, t1w, flair, output, mask=mask, samples=samples, seed=seed,
                                   overwrite=overwrite)
    for path in written:
        typer.echo(f"wrote {path}")


def _bids_manifest(bids: Path) -> Path:
    from demist.data.manifest import MANIFEST_NAME
    from demist.preprocessing.bids import DERIVATIVE

    manifest = bids / DERIVATIVE / MANIFEST_NAME
    if not manifest.is_file():
        raise DemistError(f"--bids {bids}: no {DERIVATIVE}/manifest.csv; run `demist preprocess --bids {bids}` first")
    return manifest


def _synthesize_bids(synthesizer, model: Path, bids: Path, samples: int, seed: int) -> None:
    """Each preprocessed session's PSR map beside its preprocessed T1w, under its BIDS derivative name; sessions
    already synthesized are skipped, a failing one does not stop the rest, and the derivative's synthesis_log.csv
    records each (as batch synthesis does)."""
    from demist.batch_log import BatchSummary, run_batch, write_batch_log
    from demist.data.manifest import load_manifest
    from demist.inference.batch import LOG_NAME
    from demist.inference.pipeline import synthesize_files
    from demist.preprocessing.bids import psr_map_beside, psr_sidecar, write_psr_sidecar

    def synthesize(record) -> None:
        record.require("t1w", "flair")
        record.require_present("brain_mask")
        out = psr_map_beside(record.t1w)
        synthesize_files(synthesizer, record.t1w, record.flair, out, mask=record.brain_mask, samples=samples, seed=seed,
                         overwrite=True)  # not done (no sidecar): what is there is left from an interrupted run
        sampler, steps = getattr(synthesizer, "sampler", "none"), getattr(synthesizer, "steps", 0)  # none: baselines
        write_psr_sidecar(out, model, sampler, steps, samples)

    manifest = _bids_manifest(bids)
    records = load_manifest(manifest, require=(), check_files=False)  # a session with a missing file fails alone
    def done(record) -> bool:  # the map and its sidecar, written last; a misnamed T1w is left to fail in `synthesize`
        if record.t1w is None:
            return False
        try:
            psr_map = psr_map_beside(record.t1w)
        except DemistError:
            return False
        return psr_map.exists() and psr_sidecar(psr_map).exists()

    summary = run_batch(records, key=lambda r: r.key, done=done, work=synthesize, summary=BatchSummary(),
                        desc="sessions")
    write_batch_log(manifest.parent / LOG_NAME, summary, [r.key for r in records])
    typer.echo(str(summary))
    if summary.failed:
        raise typer.Exit(code=1)


def _preprocess_batch(manifest: Path, folder: Path, device: str) -> int:
    """Preprocess a manifest's raw sessions into `folder` (resumable), which then holds the manifest of those done;
    returns how many failed (reported, left out of synthesis, and counted in the exit code)."""
    from demist.preprocessing.batch import preprocess_manifest

    summary, _ = preprocess_manifest(manifest, folder, device=device)
    typer.echo(str(summary))
    return len(summary.failed)


def _synthesize_raw(synthesizer, t1w: Path, flair: Path, output: Path, samples: int, seed: int, overwrite: bool,
                    device: str) -> list[Path]:
    """One raw scan: preprocess it in a temporary folder, then synthesize on the raw T1w's grid."""
    import tempfile

    from demist.devices import resolve_device
    from demist.inference.pipeline import synthesize_files
    from demist.preprocessing.session import SessionFiles, preprocess_session

    with tempfile.TemporaryDirectory(prefix="demist-preprocess-") as work:
        files = SessionFiles.in_folder(Path(work))
        preprocess_session(t1w, flair, files, device=str(resolve_device(device)), key=str(t1w))
        return synthesize_files(synthesizer, files.t1w, files.flair, output, mask=files.brain_mask, samples=samples,
                                seed=seed, overwrite=overwrite)
