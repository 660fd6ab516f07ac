"""`demist cv`: subject-grouped K-fold cross-validation of several methods, as the paper reports them.

Layout of DIR: `splits.json` (seeded, reused on rerun); per fold `fold-K/stage1/`, `fold-K/backbone/` (trained once
per fold and shared by every method that needs them), `fold-K/runs/<method>/`, `fold-K/predictions/<method>/`,
`fold-K/evaluation/`, `fold-K/timings.json` (minutes of each step that ran); then `per_session.csv`, `table.md`
(with the per-lesion AUC of each method, mean ± SD over folds) and `table.csv` over all folds. When DEMIST is among the
methods, the reference rows `ae-ceiling` and `aligned-condition` of its run, and with `mean_samples` > 1 the mean of
that many of its samples (`demist-meanK`), are scored beside it (the reference rows are never tested against).
Each step is skipped when its output is finished and resumed from its last checkpoint when it is not, so an
interrupted cross-validation continues where it stopped.

Folds can also run as independent jobs (`demist cv --fold K`, e.g. one Slurm array task each, all with the same
options) and be merged when all have finished (`demist cv --out DIR --collect`); the table is the same as one run's.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from demist.config import Config, config_to_dict
from demist.errors import DemistError
from demist.methods import Method, TrainJob, load_synthesizer
from demist.workflows.settings import record_settings
from demist.runs import RUN_FILE

#: The settings the folds' runs were trained with, checked on a rerun (`settings.record_settings`).
SETTINGS_FILE = "cv.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CVPlan:
    """What every fold of one cross-validation shares."""

    manifest: Path
    out: Path
    methods: Sequence[Method]
    config: Config
    max_steps: int | None
    device: str
    prior: object  # a demist.prior.Prior, or None: each fold trains Stage 1 and the backbone
    method_configs: Mapping[str, Config] = field(default_factory=dict)
    mean_samples: int = 0  # > 1: the first DEMIST run's mean of this many samples is scored as `demist-meanK`

    def config_of(self, method: Method) -> Config:
        """The config `method` trains with: its own (an ablation takes its method's), else the shared one."""
        return self.method_configs.get(method.ablation_of or method.name, self.config)


def run_cv(manifest: Path, out: Path, methods: Sequence[Method], config: Config, folds: int = 5, seed: int = 0,
           max_steps: int | None = None, device: str = "auto", prior: str = "none",
           fold: int | None = None, method_configs: Mapping[str, Config] | None = None,
           mean_samples: int = 0) -> Path:
    """Cross-validate `methods`; returns the path of the Table-1-like markdown table.

    With a `prior` ("embedded" or a prior directory), each fold's Stage 1 is the alignment on the prior's
    autoencoders and the backbone is the prior's (see demist.prior). With `fold`, only that fold runs (an independent
    job, e.g. one task of a Slurm array) and its evaluation summary's path is returned; `collect_cv` then merges the
    finished folds into the table. `method_configs` gives a method (and its ablations) a config of its own for its
    training, e.g. its step count, so that every method gets the same CPU budget; Stage 1 and the backbone use
    `config`. With `mean_samples` > 1, the first DEMIST run's mean of that many samples per session is scored too
    (`demist-meanK`), as in the demo."""
    from demist.data.manifest import load_manifest, subjects_of
    from demist.evaluation.crossval import SPLITS_FILE, load_or_create_splits
    from demist.prior import check_cohort_apart, resolve_prior

    if fold is not None and not 0 <= fold < folds:  # before splits.json is written: a typo must not pin the folds
        raise DemistError(f"--fold {fold}: expected a fold from 0 to {folds - 1} of the {folds} folds")
    records = load_manifest(manifest, require=("t1w", "flair", "psr"))
    chosen = resolve_prior(prior, config)
    check_cohort_apart(manifest, chosen)
    subjects = subjects_of(records)
    groups = {r.subject: r.group for r in records}
    strata = [groups[s] for s in subjects]
    if min(strata.count(g) for g in set(strata)) < folds:  # too few of a group to stratify: plain grouped folds
        strata = None
    # deterministic for (subjects, folds, seed), so fold jobs started together write the same file
    splits = load_or_create_splits(out / SPLITS_FILE, subjects, folds, seed, strata=strata)
    unknown = sorted(set(method_configs or {}) - {name for m in methods for name in (m.name, m.ablation_of)})
    if unknown:
        raise DemistError(f"method configs for {', '.join(unknown)}: not among the methods cross-validated")
    record_settings(out / SETTINGS_FILE, {"max_steps": max_steps, "prior": prior, "config": config_to_dict(config),
                                          "method_configs": {name: config_to_dict(c) for name, c in
                                                             sorted((method_configs or {}).items())}},
                    runs_finished=any(out.glob("fold-*/**/run.json")))
    plan = CVPlan(manifest, out, methods, config, max_steps, device, chosen, dict(method_configs or {}),
                  mean_samples)
    for k in range(len(splits)) if fold is None else (fold,):
        run_fold(plan, k, splits[k], records)
    if fold is not None:
        return out / f"fold-{fold}" / "evaluation" / "summary.json"
    return collect_cv(out)


def run_fold(plan: CVPlan, k: int, test_subjects: Sequence[str], records: Sequence) -> None:
    """Train, synthesize and evaluate every method of one fold; finished steps are skipped."""
    from demist.data.manifest import select_subjects, subjects_of
    from demist.evaluation.evaluate import evaluate_predictions
    from demist.data.manifest import prediction_path
    from demist.inference.batch import synthesize_manifest
    from demist.prior import align_to_prior
    from demist.training.stage1 import train_stage1

    config, device, max_steps, manifest = plan.config, plan.device, plan.max_steps, plan.manifest
    fold = plan.out / f"fold-{k}"
    train_subjects = [s for s in subjects_of(records) if s not in set(test_subjects)]
    held_out = select_subjects(records, test_subjects)
    test_keys = [r.key for r in held_out]
    log.info("fold %d: %d training subjects, %d held-out sessions", k, len(train_subjects), len(test_keys))
    stage1 = fold / "stage1" / "stage1"
    backbone = fold / "backbone" if plan.prior is None else plan.prior.backbone
    needs = {n for m in plan.methods for n in m.needs}
    if "stage1" in needs and not (stage1 / RUN_FILE).exists():
        with timed(fold, "stage1"):
            if plan.prior is None:
                train_stage1(select_subjects(records, train_subjects), config, fold / "stage1",
                             max_steps=max_steps, device=device, resume=True)
            else:
                align_to_prior(select_subjects(records, train_subjects), plan.prior, config, stage1,
                               max_steps=max_steps, device=device, resume=True)
    if "backbone" in needs and not (backbone / RUN_FILE).exists():
        from demist.training.backbone import train_backbone

        with timed(fold, "backbone"):
            train_backbone(manifest, stage1, config, backbone, max_steps=max_steps, device=device,
                           resume=True, subjects=train_subjects)

    def unfinished(predictions_dir: Path) -> bool:
        return any(not prediction_path(predictions_dir, r).exists() for r in held_out)

    predictions = {}
    for method in plan.methods:
        run = fold / "runs" / method.name
        if not (run / RUN_FILE).exists():
            log.info("fold %d: training %s", k, method.name)
            with timed(fold, f"train {method.name}"):
                method.train(TrainJob(manifest, plan.config_of(method), run, stage1=stage1, backbone=backbone,
                                      subjects=train_subjects, max_steps=max_steps, device=device, resume=True))
        predictions[method.name] = fold / "predictions" / method.name
        with timed(fold, f"synthesize {method.name}") if unfinished(predictions[method.name]) else nullcontext():
            summary = synthesize_manifest(load_synthesizer(run, device=device), manifest,
                                          predictions[method.name], sessions=test_keys)
        if summary.failed:
            raise DemistError(f"fold {k}: {method.name} failed on {', '.join(summary.failed)}")
    demist_runs = [m.name for m in plan.methods if m.name.startswith("demist")]
    if demist_runs:  # the reference rows, and the mean of K samples, of the (first) DEMIST run
        from demist.inference.base import REFERENCES, mean_row
        from demist.inference.references import synthesize_references

        demist = load_synthesizer(fold / "runs" / demist_runs[0], device=device)
        if plan.mean_samples > 1:
            row = mean_row(plan.mean_samples)
            predictions[row] = fold / "predictions" / row
            with timed(fold, f"synthesize {row}") if unfinished(predictions[row]) else nullcontext():
                summary = synthesize_manifest(demist, manifest, predictions[row], samples=plan.mean_samples,
                                              sessions=test_keys)
            if summary.failed:
                raise DemistError(f"fold {k}: {row} failed on {', '.join(summary.failed)}")
        references = {name: fold / "predictions" / name for name in REFERENCES}
        for name, summary in synthesize_references(demist, manifest, references, sessions=test_keys).items():
            if summary.failed:
                raise DemistError(f"fold {k}: reference row {name} failed on {', '.join(summary.failed)}")
        predictions.update(references)
    evaluate_predictions(manifest, predictions, fold / "evaluation", psr_range=config.data.psr_range,
                         ring_mm=config.evaluation.ring_mm, bootstrap=config.evaluation.bootstrap, sessions=test_keys)


def collect_cv(out: Path) -> Path:
    """Merge the finished folds of `out` (their evaluation summaries) into the tables; every fold of splits.json must
    be finished, with the same rows."""
    from demist.evaluation.crossval import SPLITS_FILE

    splits_file = out / SPLITS_FILE
    if not splits_file.is_file():
        raise DemistError(f"--out {out}: holds no {SPLITS_FILE}; expected the folder of a `demist cv` run")
    folds = len(json.loads(splits_file.read_text())["folds"])
    rows: list[dict] = []
    lesion_auc: dict[int, dict[str, float]] = {}
    sources: dict[int, list[str]] = {}
    unfinished = [k for k in range(folds) if not (out / f"fold-{k}" / "evaluation" / "summary.json").is_file()]
    if unfinished:
        names = ", ".join(map(str, unfinished))
        raise DemistError(f"--out {out}: fold(s) {names} of {folds} not finished (no evaluation/summary.json); "
                          f"expected every fold evaluated: run `demist cv --fold K` with the same options for K in "
                          f"{names} first")
    for k in range(folds):
        evaluation = out / f"fold-{k}" / "evaluation"
        summary = json.loads((evaluation / "summary.json").read_text())
        sources[k] = sorted(summary["methods"])
        rows += [{**row, "fold": k} for row in read_per_session(evaluation / "per_session.csv")]
        auc = (summary.get("lesion_contrast") or {}).get("auc", {})
        lesion_auc[k] = {source: float(entry["combined"]["auc"]) for source, entry in auc.items()}
    if len({tuple(v) for v in sources.values()}) > 1:
        detail = "; ".join(f"fold {k}: {', '.join(v)}" for k, v in sources.items())
        raise DemistError(f"folds of {out} scored different rows ({detail}); expected the same --methods in every fold")
    return write_cv_tables(out, rows, lesion_auc)


@contextmanager
def timed(fold: Path, step: str) -> Iterator[None]:
    """Add the minutes a step takes to `fold/timings.json` (kept across reruns; a rerun step adds its own)."""
    from demist.atomic import atomic_write

    start = time.perf_counter()
    try:
        yield
    finally:  # an interrupted step keeps its minutes: the rerun adds the rest
        minutes = (time.perf_counter() - start) / 60
        file = fold / "timings.json"
        timings = json.loads(file.read_text()) if file.exists() else {}
        timings[step] = round(timings.get(step, 0.0) + minutes, 3)
        atomic_write(file, json.dumps(timings, indent=1) + "\n")
        log.info("%s: %s took %.1f min", fold.name, step, minutes)


def read_per_session(path: Path) -> list[dict]:
    """Rows of an evaluation's per_session.csv, metric columns as floats."""
    from demist.evaluation.metrics import METRICS

    with open(path, newline="") as fh:
        return [{k: (float(v) if k in METRICS else v) for k, v in row.items()} for row in csv.DictReader(fh)]


def write_cv_tables(out: Path, rows: list[dict], lesion_auc: dict[int, dict[str, float]] | None = None) -> Path:
    """Mean ± SD across folds, paired t-tests against the best other method (reference rows take no part); markdown
    (with the per-lesion AUC per method over folds, when given), CSV and per-session CSV."""
    from demist.atomic import atomic_path, atomic_write
    from demist.evaluation.metrics import METRICS
    from demist.evaluation.stats import paired_tests, summarise_folds, summary_markdown, write_summary_csv
    from demist.inference.base import REFERENCES

    # the metrics every row has: folds evaluated before a metric was added still collect, without that metric
    metrics = [m for m in METRICS if all(m in row for row in rows)]
    summary = summarise_folds(rows, metrics)
    tests = paired_tests([row for row in rows if row["method"] not in REFERENCES], metrics)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(out / "per_session.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    write_summary_csv(out / "table.csv", summary, tests)
    return atomic_write(out / "table.md", summary_markdown(summary, tests) + lesion_auc_markdown(lesion_auc or {}))


def lesion_auc_markdown(lesion_auc: dict[int, dict[str, float]]) -> str:
    """Per-lesion lesion-vs-NAWM AUC (pNAWM and dNAWM pairs together) per source, mean ± SD over the folds that had
    lesions; empty without any."""
    import numpy as np

    sources = list(dict.fromkeys(s for fold in lesion_auc.values() for s in fold))
    if not sources:
        return ""
    lines = ["", "Per-lesion lesion-vs-NAWM ROC AUC (mean ± SD over folds with lesions; 1 = every lesion's mean PSR "
             "below every NAWM region's, its own and the other lesions'):", "", "| source | AUC | folds |",
             "|---|---:|---:|"]
    for source in sources:
        values = np.array([fold[source] for fold in lesion_auc.values() if source in fold])
        sd = f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else ""
        lines.append(f"| {source} | {values.mean():.3f}{sd} | {len(values)} |")
    return "\n".join(lines) + "\n"
