"""`demist phantom`, `demist demo` and `demist cv`: the synthetic cohort and the orchestrated workflows."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from demist.atomic import check_output_folder
from demist.cli.options import DEVICE
from demist.errors import DemistError
from demist.inference.base import MEAN_SAMPLES
from demist.methods import METHODS


def phantom(
    out: Path = typer.Option(..., "--out", help="Folder to write the cohort into (created; must be new or empty)."),
    subjects: int = typer.Option(..., "--subjects", min=1, help="Number of subjects (about 2 MS patients per "
                                 "control)."),
    spacing: float = typer.Option(2.0, "--spacing", help="Voxel size in mm: 1 (paper) or 2 (tiny)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed; the same seed gives identical files."),
    raw: bool = typer.Option(False, "--raw", help="Also write each session as a scanner gives it (head, bias field, "
                             "moved thick-slice FLAIR) in its raw/ folder, with the true transform, and "
                             "raw_manifest.csv (for demist preprocess)."),
) -> None:
    """Generate the embedded synthetic MS cohort (T1w, FLAIR, PSR, masks, metadata) and its manifest."""
    from demist.data.phantom import add_raw_sessions, generate_cohort
    from demist.data.summary import cohort_summary

    manifest = generate_cohort(check_output_folder(out, "--out"), subjects, spacing=spacing, seed=seed, progress=True)
    typer.echo(cohort_summary(manifest))
    typer.echo(f"manifest: {manifest}")
    if raw:
        typer.echo(f"raw manifest: {add_raw_sessions(out, seed)}")


def demo(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for the cohort, runs, predictions and report."),
    subjects: int = typer.Option(14, "--subjects", min=2, help="Synthetic subjects to generate."),
    held_out: Optional[int] = typer.Option(None, "--held-out", min=1, help="Subjects kept out of training, for "
                                           "evaluation (default 3), drawn by --seed with an MS patient among them."),
    held_out_subjects: str = typer.Option("", "--held-out-subjects", help="Comma-separated subjects to hold out "
                                          "(e.g. sub-001,sub-003,sub-004) instead of --held-out drawn by --seed, so "
                                          "that demos of different cohort sizes are scored on the same subjects."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the cohort and of the split."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1,
                                            help="Cap every training stage (a quick smoke run; numbers meaningless)."),
    mean_samples: int = typer.Option(MEAN_SAMPLES, "--mean-samples", min=0,
                                     help="Samples averaged in the report's demist-meanK row (0 or 1: no such row)."),
    distill: bool = typer.Option(False, "--distill", help="Also distil DEMIST into a few-step student (demist train "
                                 "distill, the config's distill settings; about 15-30 more minutes on 2 cores) and "
                                 "score it and the mean of its samples."),
    student_steps: Optional[int] = typer.Option(None, "--student-steps", min=1, help="With --distill: the student's "
                                                "DDIM steps (default: the config's distill.student_steps)."),
    prior: str = typer.Option("embedded", "--prior", help="embedded (autoencoders and backbone from the prior "
                              "shipped with demist), none (train them on the cohort) or a prior directory."),
    config: str = typer.Option("tiny", "--config", help="Preset (tiny, paper) or a TOML file naming its base; a "
                               "prior must have been pretrained with the same autoencoder and backbone keys."),
    device: str = DEVICE,
) -> None:
    """The end-to-end demo: cohort, Stage 1, backbone, DEMIST, ridge floor, synthesis, evaluation, report.md."""
    if student_steps is not None and not distill:
        raise DemistError(f"--student-steps {student_steps}: without --distill there is no student; expected both")
    named = tuple(s.strip() for s in held_out_subjects.split(",") if s.strip())
    if held_out is not None and named:
        raise DemistError(f"--held-out {held_out} and --held-out-subjects {held_out_subjects}: expected one of them")
    from demist.config import load_config
    from demist.workflows.demo import DEFAULT_HELD_OUT, DemoPlan, run_demo

    held_out = DEFAULT_HELD_OUT if held_out is None else held_out
    cfg = load_config(config)
    if distill:  # a student that cannot follow the teacher's sampler fails now, not after 15 minutes of training
        import dataclasses

        from demist.diffusion.schedule import NoiseSchedule
        from demist.training.distill import student_timesteps

        steps = cfg.distill.student_steps if student_steps is None else student_steps
        student_timesteps(cfg.replace(distill=dataclasses.replace(cfg.distill, student_steps=steps)),
                          NoiseSchedule.from_config(cfg.diffusion))
    if named:  # the cohort is not generated yet: check the names against the IDs it will have, not after it
        from demist.data.phantom.subject import phantom_subject_id

        ids = [phantom_subject_id(i) for i in range(subjects)]
        unknown = [s for s in named if s not in ids]
        if unknown:
            raise DemistError(f"--held-out-subjects: {', '.join(map(repr, unknown))} not in a cohort of {subjects} "
                              f"subjects; expected some of {ids[0]} … {ids[-1]}")
    if not named and held_out >= subjects:
        raise DemistError(f"--held-out {held_out} with --subjects {subjects}: expected fewer held-out subjects than "
                          "subjects, so that some are left to train on")
    report = run_demo(DemoPlan(out=check_output_folder(out, "--out"), subjects=subjects, held_out=held_out, seed=seed,
                               max_steps=max_steps, mean_samples=mean_samples, distill=distill,
                               student_steps=student_steps, prior=prior, held_out_subjects=named),
                      config=cfg, device=device)
    typer.echo(f"report: {report}")


def cv(
    manifest: Optional[Path] = typer.Option(None, "--manifest",
                                            help="Manifest of the cohort (sessions with PSR and masks)."),
    out: Path = typer.Option(..., "--out", help="Folder for splits, per-fold runs, predictions and tables."),
    methods: str = typer.Option("demist,ridge", "--methods", help=f"Comma-separated: {', '.join(METHODS)}."),
    folds: int = typer.Option(5, "--folds", min=2, help="Subject-grouped folds."),
    config: str = typer.Option("tiny", "--config", help="Preset (tiny, paper) or a TOML file naming its base."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the split (saved in splits.json)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Cap every training stage."),
    prior: str = typer.Option("none", "--prior", help="none (each fold trains Stage 1 and the backbone), embedded "
                              "or a prior directory (each fold aligns E_cond on the prior's autoencoders and "
                              "freezes the prior's backbone)."),
    fold: Optional[int] = typer.Option(None, "--fold", min=0, help="Run only this fold (0-based), as an independent "
                                       "job; merge the finished folds with --collect."),
    collect: bool = typer.Option(False, "--collect", help="Only merge the finished folds in --out into the table."),
    mean_samples: int = typer.Option(MEAN_SAMPLES, "--mean-samples", min=0,
                                     help="With DEMIST among the methods: samples averaged in the demist-meanK row "
                                     "(0 or 1: no such row)."),
    device: str = DEVICE,
) -> None:
    """Cross-validate methods with subject-grouped folds; Table-1-like mean ± SD and paired t-tests."""
    from demist.workflows.cv import collect_cv, run_cv

    check_output_folder(out, "--out")
    if collect:
        if fold is not None:
            raise DemistError("--collect and --fold: --collect merges folds that have finished; expected one of them")
        typer.echo(collect_cv(out).read_text())
        return
    if manifest is None:
        raise DemistError("--manifest: missing; expected the cohort's manifest (only --collect runs without it)")
    from demist.config import load_config
    from demist.methods import parse_methods

    result = run_cv(manifest, out, parse_methods(methods), load_config(config), folds=folds, seed=seed,
                    max_steps=max_steps, device=device, prior=prior, fold=fold, mean_samples=mean_samples)
    typer.echo(f"fold {fold} evaluated: {result}" if fold is not None else result.read_text())
