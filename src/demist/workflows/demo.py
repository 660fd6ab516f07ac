"""`demist demo`: the whole story on the embedded synthetic cohort, in one command.

Generate a 2 mm cohort, hold out some subjects, train `tiny` Stage 1 and DEMIST on the others, fit the ridge floor,
synthesize the held-out sessions with both, evaluate them with the paper's protocol and write `report.md`. By default
the autoencoders and the frozen backbone come from the prior shipped with demist (pretrained on a synthetic cohort of
its own, as the paper's backbone is pretrained elsewhere), so Stage 1 is the alignment; `--prior none` trains them on
the cohort instead. With `distill`, DEMIST is also distilled into a few-step student (`runs/student`, the config's
[distill]) that is scored beside it. Every step leaves a finished directory behind and is skipped when rerun, so an
interrupted demo continues where it stopped, and a finished demo rerun with `--distill` adds only the student.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from demist.atomic import atomic_write
from demist.config import Config, config_to_dict, load_config
from demist.data.manifest import MANIFEST_NAME
from demist.errors import DemistError
from demist.inference.base import MEAN_SAMPLES, REFERENCES, mean_row
from demist.workflows.demo_report import STUDENT_ROW
from demist.workflows.settings import record_settings
from demist.runs import RUN_FILE

log = logging.getLogger(__name__)

#: Subjects the demo holds out unless told otherwise (`--held-out`, `--held-out-subjects`).
DEFAULT_HELD_OUT = 3
#: The settings the demo's runs were trained with, checked on a rerun (`settings.record_settings`).
SETTINGS_FILE = "demo.json"

#: Rough minutes per step of the tiny demo on 2 CPU cores, said up front.
EXPECTED_MINUTES = {"cohort": 0.5, "stage1": 73, "backbone": 13, "demist": 10, "ridge": 0.5, "synthesis": 10,
                    "evaluation": 1}
#: With a prior, Stage 1 is the alignment alone and the backbone is the prior's.
EXPECTED_MINUTES_WITH_PRIOR = {**EXPECTED_MINUTES, "stage1": 10, "backbone": 0}
#: With --distill: the few-step student of the demo's DEMIST (`demist train distill`, the preset's [distill]).
EXPECTED_DISTILL_MINUTES = 30
#: The same with a prior on a CPU with native bf16 (AVX-512 BF16 / AMX), where every network runs under bf16 autocast:
#: measured on 2 cores of such a Xeon, and the 4800-step alignment on an AMD EPYC with AVX-512 BF16 (the figures
#: above are a 2-core CPU without it; their alignment is projected from 1200 steps). Without a prior no such CPU has
#: been measured, and the figures above stand.
EXPECTED_MINUTES_WITH_PRIOR_BF16 = {"cohort": 0.5, "stage1": 5, "backbone": 0, "demist": 6, "ridge": 0.5,
                                    "synthesis": 1.5, "evaluation": 0.5}
EXPECTED_DISTILL_MINUTES_BF16 = 15


def expected_minutes(prior: bool, distill: bool, native_bf16: bool) -> dict[str, float]:
    """Rough minutes per demo step on 2 CPU cores, said up front and before each step."""
    if not prior:
        expected = dict(EXPECTED_MINUTES)
    else:
        expected = dict(EXPECTED_MINUTES_WITH_PRIOR_BF16 if native_bf16 else EXPECTED_MINUTES_WITH_PRIOR)
    if distill:
        expected["distill"] = EXPECTED_DISTILL_MINUTES_BF16 if native_bf16 else EXPECTED_DISTILL_MINUTES
    return expected


@dataclass(frozen=True)
class DemoPlan:
    """Where everything goes, and how big the demo is."""

    out: Path
    subjects: int
    held_out: int
    seed: int
    max_steps: int | None  # None: the preset's budgets
    mean_samples: int = MEAN_SAMPLES  # the "demist-meanK" row averages this many samples; 0 leaves the row out
    distill: bool = False  # also distil DEMIST into a few-step student and score it (and the mean of its samples)
    student_steps: int | None = None  # the student's DDIM steps; None: the config's distill.student_steps
    prior: str = "embedded"  # "embedded", "none" or a prior directory (see demist.prior)
    held_out_subjects: tuple[str, ...] = ()  # named held-out subjects; empty: `held_out` of them drawn by `seed`

    @property
    def manifest(self) -> Path:
        return self.out / "cohort" / MANIFEST_NAME

    def run(self, name: str) -> Path:
        return self.out / "runs" / name

    def predictions(self, method: str) -> Path:
        return self.out / "predictions" / method

    @property
    def stage1(self) -> Path:
        return self.run("stage1") / "stage1"

    def backbone(self) -> Path:
        """The backbone DEMIST was trained on: the demo's own, or the prior's (named by the DEMIST run)."""
        from demist.runs import read_run

        demist = self.run("demist")
        if (demist / RUN_FILE).is_file():
            return Path(read_run(demist, "demist", what="demo DEMIST run").parents["backbone"]["path"])
        return self.run("backbone")

    @property
    def split_file(self) -> Path:
        return self.out / "split.json"

    def subject_split(self) -> tuple[list[str], list[str]]:
        """(training subjects, held-out subjects) of the generated cohort: as this demo folder recorded them when it
        was first split, else as the plan asks (named subjects, or `held_out` drawn by `seed`)."""
        recorded = self._recorded_split()
        return recorded if recorded is not None else self._asked_split()

    def _recorded_split(self) -> tuple[list[str], list[str]] | None:
        if not self.split_file.is_file():
            return None
        try:
            recorded = json.loads(self.split_file.read_text())
            return [str(s) for s in recorded["train"]], [str(s) for s in recorded["held_out"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise DemistError(f"{self.split_file}: unreadable ({type(exc).__name__}: {exc}); expected "
                              '{"train": [subjects], "held_out": [subjects]} as the demo writes it') from None

    def _asked_split(self) -> tuple[list[str], list[str]]:
        if self.held_out_subjects:
            return named_split(self.manifest, self.held_out_subjects)
        return split_subjects(self.manifest, self.held_out, self.seed)

    def split(self) -> tuple[list[str], list[str]]:
        """(training subjects, held-out session keys) of a generated cohort."""
        from demist.data.manifest import load_manifest, select_subjects

        train, test = self.subject_split()
        return train, [r.key for r in select_subjects(load_manifest(self.manifest), test)]

    def record_split(self) -> tuple[list[str], list[str]]:
        """The plan's split, written to `split.json` the first time; a rerun into a folder split otherwise is refused,
        because its finished steps (skipped on a rerun) were trained on the other split. A folder from before
        `split.json` is checked against the subjects its Stage-1 run was trained on."""
        asked = self._asked_split()
        recorded = self._recorded_split()
        if recorded is not None:
            if sorted(recorded[1]) != sorted(asked[1]):
                raise DemistError(
                    f"--out {self.out}: its runs were trained with held-out subjects {', '.join(recorded[1])}; this "
                    f"run asks for {', '.join(asked[1])}; expected the same split (--held-out-subjects "
                    f"{','.join(recorded[1])}), or a new --out")
            return recorded
        trained = self._stage1_subjects()
        if trained is not None and trained != sorted(asked[0]):
            raise DemistError(
                f"--out {self.out}: its Stage-1 run was trained on {', '.join(trained)}; this run would train on "
                f"{', '.join(asked[0])}; expected the same split, or a new --out")
        atomic_write(self.split_file, json.dumps({"train": asked[0], "held_out": asked[1]}, indent=1) + "\n")
        return asked

    def _stage1_subjects(self) -> list[str] | None:
        """The subjects of a finished Stage-1 run in this folder (sorted), or None when there is none yet."""
        if not (self.stage1 / RUN_FILE).is_file():
            return None
        from demist.runs import read_run

        sessions = read_run(self.stage1, "stage1", what="demo Stage-1 run").training.get("sessions", [])
        return sorted({key.split("/")[0] for key in sessions})


def split_subjects(manifest: Path, held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """Training and held-out subjects (all sessions of a subject on one side), seeded; the held-out set includes an
    MS patient whenever the cohort has one, so the lesion analysis has lesions to look at."""
    import numpy as np

    from demist.data.manifest import load_manifest, subjects_of

    records = load_manifest(manifest)
    subjects = subjects_of(records)
    if not 1 <= held_out < len(subjects):
        raise DemistError(f"--held-out {held_out}: expected 1 to {len(subjects) - 1} for {len(subjects)} subjects")
    patient = {r.subject: r.is_patient for r in records}
    order = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    patients = [s for s in order if patient[s]]
    first = patients[:1] or order[:1]
    test = first + [s for s in order if s not in first][: held_out - 1]
    return [s for s in subjects if s not in test], sorted(test)


def named_split(manifest: Path, held_out: Sequence[str]) -> tuple[list[str], list[str]]:
    """Training and held-out subjects when the held-out ones are named (`--held-out-subjects`), so that demos of
    different cohort sizes can be scored on the same subjects."""
    from demist.data.manifest import load_manifest, subjects_of

    records = load_manifest(manifest)
    subjects = subjects_of(records)
    test = sorted({s.strip() for s in held_out if s.strip()})
    unknown = [s for s in test if s not in subjects]
    if unknown:
        raise DemistError(f"--held-out-subjects: {', '.join(map(repr, unknown))} not in the cohort; expected some of "
                          f"{', '.join(subjects)}")
    if not test or len(test) >= len(subjects):
        raise DemistError(f"--held-out-subjects: {len(test)} of {len(subjects)} subjects named; expected at least one "
                          "held out and one left to train on")
    patient = {r.subject: r.is_patient for r in records}
    if not any(patient[s] for s in test):
        log.warning("--held-out-subjects %s: all healthy controls, so the lesion analysis has no lesions to score",
                    ",".join(test))
    return [s for s in subjects if s not in test], test


def _record(out: Path, name: str, minutes: float) -> float:
    """Keep a step's minutes in `out/timings.json`, so a rerun's report still shows what each step took."""
    file = out / "timings.json"
    timings = json.loads(file.read_text()) if file.exists() else {}
    timings[name] = round(minutes, 2)
    atomic_write(file, json.dumps(timings, indent=1) + "\n")
    return timings[name]


def _recorded(out: Path, name: str) -> float:
    file = out / "timings.json"
    return float(json.loads(file.read_text()).get(name, 0.0)) if file.exists() else 0.0


def _step(out: Path, name: str, done: Path, action: Callable[[], object], expected: float) -> float:
    """Run a step unless its output exists; returns the minutes it took (when it ran before: as recorded then)."""
    if done.exists():
        log.info("demo: %s already done (%s)", name, done)
        return _recorded(out, name)
    log.info("demo: %s (%s) ...", name, "under a minute" if expected < 1 else f"about {expected:.0f} min")
    start = time.perf_counter()
    action()
    minutes = (time.perf_counter() - start) / 60
    log.info("demo: %s done in %.1f min", name, minutes)
    return _record(out, name, minutes)


def time_estimate(cfg: Config, tiny_minutes: float) -> str:
    """What the demo says up front about its duration: the step estimates are the `tiny` preset's, and another
    config's (finer latents, more steps) can take several times longer."""
    if cfg == load_config("tiny"):
        return f"Expect about {tiny_minutes:.0f} minutes on 2 CPU cores"
    return (f"With the tiny preset this takes about {tiny_minutes:.0f} minutes on 2 CPU cores; config {cfg.preset} "
            "may take longer")


def run_demo(plan: DemoPlan, config: Config | None = None, device: str = "auto") -> Path:
    """Run every step of the demo (see the module docstring); returns the report's path."""
    from demist.baselines.ridge import train_ridge
    from demist.data.manifest import load_manifest, select_subjects
    from demist.data.phantom import generate_cohort
    from demist.data.phantom.cohort import check_same_cohort
    from demist.devices import has_native_bf16, resolve_device
    from demist.evaluation.evaluate import evaluate_predictions
    from demist.inference.batch import synthesize_manifest
    from demist.methods import load_synthesizer
    from demist.inference.references import synthesize_references
    from demist.prior import align_to_prior, resolve_prior
    from demist.training.backbone import train_backbone
    from demist.training.distill import train_distill
    from demist.training.stage1 import train_stage1
    from demist.training.stage2 import train_demist

    cfg = config or load_config("tiny")
    prior = resolve_prior(plan.prior, cfg)
    if prior is not None and plan.seed == prior.cohort_seed:
        raise DemistError(f"--seed {plan.seed}: the prior {prior.path} was pretrained on the cohort of this seed; "
                          "expected another seed (or --prior none)")
    check_same_cohort(plan.out / "cohort", plan.subjects, cfg.data.spacing, plan.seed)
    settings = {"subjects": plan.subjects, "seed": plan.seed, "max_steps": plan.max_steps, "prior": plan.prior,
                "config": config_to_dict(cfg)}
    if plan.distill:
        settings["student_steps"] = plan.student_steps or cfg.distill.student_steps
    record_settings(plan.out / SETTINGS_FILE, settings, runs_finished=any((plan.out / "runs").glob("**/run.json")))
    torch_device = resolve_device(device)
    native_bf16 = torch_device.type == "cpu" and has_native_bf16(torch_device)  # the estimates are CPU minutes
    expected = expected_minutes(prior is not None, plan.distill, native_bf16)
    estimate = time_estimate(cfg, sum(expected.values()) if plan.max_steps is None else 3)
    log.info("demo: %d synthetic subjects at %.0f mm, %s held out; %s; train DEMIST and ridge; synthesize and "
             "evaluate. %s. Output: %s", plan.subjects, cfg.data.spacing,
             ", ".join(plan.held_out_subjects) or plan.held_out,
             "train Stage 1 and the backbone" if prior is None else
             f"autoencoders and backbone from the prior {prior.path}, align E_cond", estimate, plan.out)

    def step(name: str, done: Path, action: Callable[[], object]) -> float:
        return _step(plan.out, name, done, action, expected.get(name, 1))

    minutes: dict[str, float] = {}
    minutes["cohort"] = step("cohort", plan.manifest, lambda: generate_cohort(
        plan.out / "cohort", plan.subjects, spacing=cfg.data.spacing, seed=plan.seed))
    train_subjects, test_subjects = plan.record_split()
    records = load_manifest(plan.manifest)
    train_records = select_subjects(records, train_subjects)
    test_keys = [r.key for r in select_subjects(records, test_subjects)]
    steps = plan.max_steps
    stage1 = plan.run("stage1")  # holds psr_ae, cond_ae and the Stage-1 run itself (plan.stage1)
    if prior is None:
        minutes["stage1"] = step("stage1", plan.stage1 / RUN_FILE, lambda: train_stage1(
            train_records, cfg, stage1, max_steps=steps, device=device, resume=True))
        backbone = plan.run("backbone")
        minutes["backbone"] = step("backbone", backbone / RUN_FILE, lambda: train_backbone(
            plan.manifest, plan.stage1, cfg, backbone, max_steps=steps, device=device, resume=True,
            subjects=train_subjects))
    else:
        minutes["stage1"] = step("stage1", plan.stage1 / RUN_FILE, lambda: align_to_prior(
            train_records, prior, cfg, plan.stage1, max_steps=steps, device=device, resume=True))
        backbone, minutes["backbone"] = prior.backbone, _record(plan.out, "backbone", 0.0)  # the prior's
    demist = plan.run("demist")
    minutes["demist"] = step("demist", demist / RUN_FILE, lambda: train_demist(
        plan.manifest, plan.stage1, backbone, cfg, demist, max_steps=steps, device=device, resume=True,
        subjects=train_subjects))
    student = plan.run("student")
    if plan.distill:
        minutes["distill"] = step("distill", student / RUN_FILE, lambda: train_distill(
            demist, student, manifest=plan.manifest, student_steps=plan.student_steps or cfg.distill.student_steps,
            max_steps=steps, device=device, resume=True))
    ridge = plan.run("ridge")
    minutes["ridge"] = step("ridge", ridge / RUN_FILE, lambda: train_ridge(
        plan.manifest, cfg, ridge, subjects=train_subjects))
    start, written = time.perf_counter(), 0
    demist_synthesizer = load_synthesizer(demist, device=device)
    sampled = [("demist", demist_synthesizer)]
    if plan.distill:
        sampled.append((STUDENT_ROW, load_synthesizer(student, device=device)))
    mean_rows = [(mean_row(plan.mean_samples, of=row), synthesizer, plan.mean_samples)
                 for row, synthesizer in sampled] if plan.mean_samples > 1 else []
    for method, synthesizer, samples in (*((row, synthesizer, 1) for row, synthesizer in sampled), *mean_rows,
                                         ("ridge", load_synthesizer(ridge, device=device), 1)):
        summary = synthesize_manifest(synthesizer, plan.manifest, plan.predictions(method), samples=samples,
                                      sessions=test_keys)
        if summary.failed:
            raise DemistError(f"demo: synthesis with {method} failed for {', '.join(summary.failed)}")
        written += len(summary.written)
    for name, summary in synthesize_references(demist_synthesizer, plan.manifest,
                                               {ref: plan.predictions(ref) for ref in REFERENCES},
                                               sessions=test_keys).items():
        if summary.failed:
            raise DemistError(f"demo: reference row {name} failed for {', '.join(summary.failed)}")
        written += len(summary.written)
    minutes["synthesis"] = (_record(plan.out, "synthesis", (time.perf_counter() - start) / 60) if written
                            else _recorded(plan.out, "synthesis"))
    evaluation = plan.out / "evaluation"
    start = time.perf_counter()
    rows = (*(row for row, _ in sampled), *(row for row, _, _ in mean_rows), "ridge", *REFERENCES)
    results = evaluate_predictions(plan.manifest, {row: plan.predictions(row) for row in rows},
                                   evaluation, psr_range=cfg.data.psr_range, ring_mm=cfg.evaluation.ring_mm,
                                   bootstrap=cfg.evaluation.bootstrap, sessions=test_keys)
    minutes["evaluation"] = _record(plan.out, "evaluation", (time.perf_counter() - start) / 60)
    from demist.workflows.demo_report import write_demo_report

    return write_demo_report(plan, results, minutes, train_subjects, test_subjects, prior)
