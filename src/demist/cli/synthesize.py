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
    model: Path = typer.Option(..., "--model", help="Run directory of `demist train demist` or of a baseline."),
    t1w: Optional[Path] = typer.Option(None, "--t1w", help="T1w (MPRAGE) NIfTI, skull-stripped or with --mask."),
    flair: Optional[Path] = typer.Option(None, "--flair", help="FLAIR NIfTI (any grid covering the same anatomy)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output PSR NIfTI (on the T1w's grid)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Brain mask; needed when the inputs are not skull-stripped."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Batch form: synthesize every session of a manifest."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Batch form: writes OUT/<subject>/<session>/psr.nii.gz."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="ddim, dpm++ or ddpm. " + DEFAULT_HELP),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (ddpm always uses all of them)."),
    start_strength: Optional[float] = typer.Option(
        None, "--start-strength", help="DEMIST/FT-LDM: 1 starts sampling from pure noise (the paper); s < 1 from the "
        "aligned condition latent noised to s·T (SDEdit). Default: the model's config (1)."),
    samples: int = typer.Option(1, "--samples", help="Samples to average; >1 also writes <name>_std.nii.gz."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same map."),
    device: str = DEVICE,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Synthesize a PSR map (PSR units, the T1w's native grid) from T1w + FLAIR."""
    single = [t1w, flair, output]
    if manifest is not None or out_dir is not None:
        if manifest is None or out_dir is None or any(v is not None for v in single):
            raise DemistError("batch form: give --manifest and --out-dir, and none of --t1w/--flair/-o")
    elif any(v is None for v in single):
        raise DemistError("give --t1w, --flair and -o for one scan, or --manifest and --out-dir for a batch")
    if samples < 1:
        raise DemistError(f"--samples {samples}: expected 1 or more")
    if steps is not None and steps < 1:
        raise DemistError(f"--steps {steps}: expected 1 or more")

    from demist.inference.pipeline import check_output_path, synthesize_files
    from demist.methods import load_synthesizer

    if output is not None:
        check_output_path(output, overwrite)  # before the model is loaded: fail fast
    synthesizer = load_synthesizer(model, sampler=sampler, steps=steps, device=device, start_strength=start_strength)
    if manifest is not None:  # under `accelerate launch` / `torchrun`, each process takes its share
        from demist.inference.batch import synthesize_manifest_distributed

        from accelerate import PartialState

        from demist.devices import resolve_device

        cpu = resolve_device(device).type == "cpu"
        summary = synthesize_manifest_distributed(synthesizer, manifest, out_dir, samples=samples, seed=seed, cpu=cpu)
        if PartialState(cpu=cpu).is_main_process:
            typer.echo(str(summary))
        if summary.failed:
            raise typer.Exit(code=1)
        return
    written = synthesize_files(synthesizer, t1w, flair, output, mask=mask, samples=samples, seed=seed,
                               overwrite=overwrite)
    for path in written:
        typer.echo(f"wrote {path}")
