"""`demist train …`: the training commands (Stage 1 here; later stages mount next to it).

Every command writes one run directory (see docs/run_directories.md) and can be resumed with `--resume` after an
interruption. Torch and MONAI are imported inside the commands, so `demist --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from demist.atomic import check_output_folder
from demist.cli.options import CONFIG, DEVICE, MANIFEST, MAX_STEPS, OUT, RESUME, TENSORBOARD
from demist.errors import DemistError

train_app = typer.Typer(
    help=(
        "Train demist's networks. Stage 1 in one go: `demist train stage1 --manifest M --config tiny --out DIR` "
        "writes DIR/psr_ae (PSR autoencoder), DIR/cond_ae (T1w+FLAIR autoencoder) and DIR/stage1 (both, after "
        "aligning the condition latent to the PSR latent); DIR/stage1 is what later stages take as --stage1. "
        "Several GPUs or CPU processes (data parallel): `accelerate launch --multi_gpu --num_processes N "
        "$(which demist) train …` (or `torchrun --nproc_per_node N $(which demist) train …`)."
    ),
    no_args_is_help=True,
)



def _check_bundle_file(path: Optional[Path]) -> Optional[Path]:
    if path is not None and not path.is_file():
        problem = "is a directory" if path.is_dir() else "file not found"
        raise DemistError(f"--init-bundle {path}: {problem}; expected the MONAI bundle's autoencoder weights (.pt)")
    return path


INIT_BUNDLE = typer.Option(None, "--init-bundle", callback=_check_bundle_file,
                           help="Initialise from a MONAI bundle autoencoder file (.pt, old or new key layout).")


def _inputs(manifest: Path, config: str | None):
    """The manifest's sessions and the config, checked before the heavy imports (a typo fails at once)."""
    from demist.config import load_config
    from demist.data.manifest import load_manifest

    return load_manifest(manifest), load_config(config) if config is not None else None


def autoencoder(
    manifest: Path = MANIFEST,
    modality: str = typer.Option(..., "--modality", help="psr (the PSR map) or cond (T1w + FLAIR)."),
    config: str = CONFIG,
    out: Path = OUT,
    init_bundle: Optional[Path] = INIT_BUNDLE,
    max_steps: Optional[int] = MAX_STEPS,
    device: str = DEVICE,
    resume: bool = RESUME,
    tensorboard: bool = TENSORBOARD,
) -> None:
    """Train one Stage-1 autoencoder (PSR or condition) into a run directory."""
    from demist.errors import DemistError

    if modality not in ("psr", "cond"):
        raise DemistError(f"--modality {modality}: unknown; expected psr or cond")
    records, cfg = _inputs(manifest, config)
    from demist.training.stage1 import train_autoencoder

    run = train_autoencoder(records, cfg, out, modality, init_bundle=init_bundle, max_steps=max_steps, device=device,
                            resume=resume, tensorboard=tensorboard)
    if run is not None:
        typer.echo(f"{run.stage}: {run.path} (PSNR on training patches {run.metrics['train_patch_psnr']:.2f} dB)")


def align(
    manifest: Path = MANIFEST,
    psr_ae: Path = typer.Option(..., "--psr-ae", help="Run directory of the PSR autoencoder."),
    cond_ae: Path = typer.Option(..., "--cond-ae", help="Run directory of the condition autoencoder."),
    out: Path = typer.Option(..., "--out", help="Stage-1 run directory to write (both autoencoders)."),
    config: Optional[str] = typer.Option(None, "--config",
                                         help="Config for the align and train settings; default: --psr-ae's."),
    max_steps: Optional[int] = MAX_STEPS,
    device: str = DEVICE,
    resume: bool = RESUME,
    tensorboard: bool = TENSORBOARD,
) -> None:
    """Freeze E_PSR, align E_cond's latent to it, compute the latent scale factor; write the Stage-1 run."""
    records, cfg = _inputs(manifest, config)
    from demist.training.stage1 import train_alignment

    run = train_alignment(records, psr_ae, cond_ae, out, cfg=cfg, max_steps=max_steps, device=device, resume=resume,
                          tensorboard=tensorboard)
    if run is not None:
        _echo_stage1(run)


def stage1(
    manifest: Path = MANIFEST,
    config: str = CONFIG,
    out: Path = typer.Option(..., "--out", help="Folder for psr_ae/, cond_ae/ and stage1/ (the Stage-1 run)."),
    init_bundle: Optional[Path] = INIT_BUNDLE,
    prior: str = typer.Option("none", "--prior", help="none (train both autoencoders here), embedded (the prior "
                              "shipped for the preset) or a prior directory: then only the alignment is trained."),
    max_steps: Optional[int] = MAX_STEPS,
    device: str = DEVICE,
    resume: bool = RESUME,
    tensorboard: bool = TENSORBOARD,
) -> None:
    """All of Stage 1: PSR autoencoder, condition autoencoder, alignment (OUT/psr_ae, OUT/cond_ae, OUT/stage1).

    OUT/stage1 holds both autoencoders and the latent scale factor; later stages take it as --stage1.
    With --prior, the autoencoders and the latent scale are the prior's and only the alignment is trained (OUT/stage1);
    take the prior's backbone (PRIOR/backbone) as --backbone.

    --resume keeps the finished parts and continues an interrupted one; --max-steps applies to all three.
    """
    check_output_folder(out, "--out")
    records, cfg = _inputs(manifest, config)
    from demist.prior import NO_PRIOR, align_to_prior, resolve_prior

    if prior != NO_PRIOR and init_bundle is not None:
        raise DemistError(f"--init-bundle and --prior {prior}: both provide the autoencoders; expected one of them")
    chosen = resolve_prior(prior, cfg)
    if chosen is not None:
        run = align_to_prior(records, chosen, cfg, out / "stage1", max_steps=max_steps, device=device, resume=resume,
                             tensorboard=tensorboard)
        if run is not None:
            _echo_stage1(run)
            typer.echo(f"backbone of the prior (pass it as --backbone): {chosen.backbone}")
        return
    from demist.training.stage1 import train_stage1

    run = train_stage1(records, cfg, out, init_bundle=init_bundle, max_steps=max_steps, device=device, resume=resume,
                       tensorboard=tensorboard)
    if run is not None:
        _echo_stage1(run)


def prior_command(
    out: Path = typer.Option(..., "--out", help="Folder for the prior's cohort, its runs and the prior (OUT/prior)."),
    config: str = CONFIG,
    subjects: Optional[int] = typer.Option(
        None, "--subjects", min=2, help="Synthetic subjects to pretrain on (default: the shipped prior's, 40)."),
    seed: Optional[int] = typer.Option(
        None, "--seed", min=0, help="Seed of the prior's synthetic cohort, apart from the seeds of the cohorts you "
        "evaluate on (default: the shipped prior's, 1000)."),
    max_steps: Optional[int] = MAX_STEPS,
    device: str = DEVICE,
) -> None:
    """Pretrain a prior (PSR and condition autoencoders and the backbone) on a synthetic cohort of its own.

    Rerun with the same --out to continue after an interruption. `scripts/train_prior.sh` reproduces the prior
    shipped with demist.
    """
    from demist.config import load_config
    from demist.prior import PRIOR_SEED, PRIOR_SUBJECTS, train_prior

    cfg = load_config(config)
    result = train_prior(check_output_folder(out, "--out"), cfg,
                         subjects=PRIOR_SUBJECTS if subjects is None else subjects,
                         seed=PRIOR_SEED if seed is None else seed, max_steps=max_steps, device=device)
    typer.echo(f"prior: {result.path} (latent scale factor {result.scale_factor:.4g})")


def _echo_stage1(run) -> None:
    m = run.metrics
    typer.echo(f"stage1: {run.path} (alignment error {m['align_mse_before']:.4g} -> {m['align_mse_after']:.4g}, "
               f"latent scale factor {run.latent_scale_factor:.4g})")
