"""The README's main job, end to end at smoke size: cohort → Stage 1 → backbone → DEMIST → ridge → synthesis →
evaluation → report, then the same command again resumes instead of redoing anything."""

from __future__ import annotations

import dataclasses
import json
import logging

import nibabel as nib
import numpy as np
import pytest

from demist.config import load_config
from demist.workflows.demo import DemoPlan, run_demo


@pytest.fixture(scope="module")
def smoke_config():
    cfg = load_config("tiny")
    return cfg.replace(
        data=dataclasses.replace(cfg.data, patch_size=(32, 32, 32)),
        sampling=dataclasses.replace(cfg.sampling, steps=3, tile_size=(8, 8, 8)),
        evaluation=dataclasses.replace(cfg.evaluation, bootstrap=50),
    )


def minutes_cells(report: str) -> list[str]:
    lines = report.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| cohort |"))
    return [cell.strip() for cell in lines[header + 2].strip("|").split("|")]


@pytest.fixture(scope="module")
def smoke_demo(tmp_path_factory, smoke_config):
    """One smoke-size demo run (every stage 2 steps), shared by the tests of this module."""
    plan = DemoPlan(out=tmp_path_factory.mktemp("demo") / "demo", subjects=3, held_out=1, seed=3, max_steps=2)
    return plan, run_demo(plan, smoke_config, device="cpu")


def test_demo_runs_end_to_end_and_resumes(smoke_demo, smoke_config, caplog):
    plan, report = smoke_demo
    text = report.read_text()
    assert "## Verdict" in text and "ridge" in text and "demist" in text
    assert "Config `tiny`" in text  # the preset (or TOML file) the DEMIST run was trained with
    assert "| backbone |" in text  # parameter counts per stream
    for figure in ("roc.png", "qualitative.png", "error_map.png"):
        if figure == "roc.png" and "roc.png" not in text:
            continue  # a held-out control has no lesions to draw
        assert (plan.out / "evaluation" / figure).stat().st_size > 1000
    predictions = sorted((plan.out / "predictions" / "demist").rglob("psr.nii.gz"))
    assert predictions
    first = predictions[0]
    subject, session = first.parent.parent.name, first.parent.name
    t1w = nib.load(plan.out / "cohort" / subject / session / "t1w.nii.gz")
    out = nib.load(first)
    assert out.shape == t1w.shape and np.allclose(out.affine, t1w.affine)
    assert np.isfinite(out.get_fdata()).all()

    # the reference rows and the K-sample mean are synthesized, on the T1w's grid, and scored like methods
    for row in ("ae-ceiling", "aligned-condition", "demist-mean3"):
        path = plan.out / "predictions" / row / subject / session / "psr.nii.gz"
        assert np.allclose(nib.load(path).affine, t1w.affine), row
        assert f"| {row} |" in text, row
    assert "What the diffusion stage adds" in text and "**Ceiling**" in text and "Mean of 3 samples" in text
    assert "PSNR with each session's mean error removed" in text and "| PSNR_CENTRED" in text

    timings = json.loads((plan.out / "timings.json").read_text())
    assert set(timings) == {"cohort", "stage1", "backbone", "demist", "ridge", "synthesis", "evaluation"}

    stamp = first.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="demist.workflows.demo"):
        again = run_demo(plan, smoke_config, device="cpu").read_text()
    assert first.stat().st_mtime_ns == stamp  # nothing re-synthesized
    # the rerun reports the minutes recorded when each training step ran
    assert minutes_cells(again)[:5] == minutes_cells(text)[:5] == [f"{timings[k]:.1f}" for k in
                                                                    ("cohort", "stage1", "backbone", "demist", "ridge")]
    assert "stage1 already done" in caplog.text and "demist already done" in caplog.text


def test_a_demo_with_distill_scores_the_student_a_run_built_on_its_demist(smoke_demo, smoke_config, tmp_path):
    import shutil

    from demist.runs import read_run

    finished, _ = smoke_demo  # a copy of it: the rerun with --distill adds the student and its rows only
    shutil.copytree(finished.out, tmp_path / "demo")
    steps = 1  # --student-steps; the smoke config's own 4 do not fit its 3-step teacher sampler
    plan = dataclasses.replace(finished, out=tmp_path / "demo", mean_samples=2, distill=True, student_steps=steps)
    text = run_demo(plan, smoke_config, device="cpu").read_text()
    student = read_run(plan.run("student"), "demist")
    assert student.parents["teacher"]["path"] == str(plan.run("demist"))
    assert student.config.sampling.steps == steps and f"**Distilled student** ({steps} DDIM step" in text
    for row in ("demist-student", "demist-student-mean2", "demist-mean2"):
        assert sorted((plan.out / "predictions" / row).rglob("psr.nii.gz")) and f"| {row} |" in text, row
    path = next((plan.out / "predictions" / "demist-student").rglob("psr.nii.gz"))
    key = path.relative_to(plan.out / "predictions" / "demist-student").parent
    t1w, single = nib.load(plan.out / "cohort" / key / "t1w.nii.gz"), nib.load(path)
    mean = nib.load(plan.out / "predictions" / "demist-student-mean2" / key / "psr.nii.gz")
    assert np.array_equal(single.affine, t1w.affine) and np.array_equal(mean.affine, t1w.affine)
    assert not np.array_equal(single.get_fdata(), mean.get_fdata())  # two student samples averaged
    assert "distill" in json.loads((plan.out / "timings.json").read_text())


def test_reference_rows_decode_the_true_and_the_condition_latent(smoke_demo, smoke_config):
    """ae-ceiling is D_PSR(E_PSR(y)) and aligned-condition D_PSR(z_c), through DEMIST's own encode/decode path; the
    ceiling refuses a session without a true PSR."""
    import torch

    from demist.data.manifest import load_manifest
    from demist.data.preprocess import prepare_session
    from demist.errors import DemistError
    from demist.methods import load_synthesizer
    from demist.inference.references import ReferenceSynthesizer

    plan, _ = smoke_demo
    demist = load_synthesizer(plan.run("demist"), device="cpu")
    record = load_manifest(plan.manifest)[0]
    session = prepare_session(record, smoke_config.data, need_target=True)
    ceiling, _ = ReferenceSynthesizer.from_synthesizer(demist, "ae-ceiling").predict(session)
    expected = demist.decode(demist.encode_target(torch.from_numpy(session.psr)[None, None]))[0, 0].numpy()
    np.testing.assert_array_equal(ceiling, expected)
    aligned, _ = ReferenceSynthesizer.from_synthesizer(demist, "aligned-condition").predict(session)
    expected = demist.decode(demist.encode_condition(torch.from_numpy(session.condition)[None]))[0, 0].numpy()
    np.testing.assert_array_equal(aligned, expected)
    assert ceiling.shape == session.brain.shape and not np.array_equal(ceiling, aligned)
    with pytest.raises(DemistError, match="needs its true PSR"):
        ReferenceSynthesizer.from_synthesizer(demist, "ae-ceiling").predict(
            dataclasses.replace(session, psr=None))
    with pytest.raises(DemistError, match="unknown"):
        ReferenceSynthesizer.from_synthesizer(demist, "oracle")


def test_a_finished_demo_names_its_stage1_backbone_and_split(smoke_demo) -> None:
    """What the benchmarks build on: the Stage-1 run, the backbone DEMIST was trained on (here the shipped prior's)
    and the held-out sessions the report scored."""
    from demist.prior import embedded_prior_dir
    from demist.runs import read_run

    plan, _ = smoke_demo
    assert read_run(plan.stage1, "stage1").latent_scale_factor > 0
    assert plan.backbone().resolve() == (embedded_prior_dir("tiny") / "backbone").resolve()
    train, held_out = plan.split()
    written = (plan.out / "predictions" / "demist").rglob("psr.nii.gz")
    scored = {f"{p.parent.parent.name}/{p.parent.name}" for p in written}
    assert set(held_out) == scored and not {k.split("/")[0] for k in held_out} & set(train)


def test_a_demo_folder_keeps_its_split_and_refuses_a_rerun_with_another(smoke_demo) -> None:
    """The split is recorded on the first run and read back by every later plan of the folder (benchmarks build on
    it); a rerun that asks for other held-out subjects would mix finished runs of two splits, so it is refused."""
    from demist.errors import DemistError
    from demist.workflows.demo import split_subjects

    plan, _ = smoke_demo
    train, held_out = split_subjects(plan.manifest, plan.held_out, plan.seed)
    assert json.loads(plan.split_file.read_text()) == {"train": train, "held_out": held_out}
    reseeded = dataclasses.replace(plan, seed=plan.seed + 1)
    assert split_subjects(plan.manifest, plan.held_out, reseeded.seed)[1] != held_out  # the seed alone draws another
    assert reseeded.subject_split() == (train, held_out)  # what benchmarks read: the recorded split
    named = dataclasses.replace(plan, held_out_subjects=tuple(held_out))
    assert named.record_split() == (train, held_out)
    other = dataclasses.replace(plan, held_out_subjects=(train[0],))
    with pytest.raises(DemistError, match=f"held-out subjects {held_out[0]}.*asks for {train[0]}"):
        other.record_split()


def test_a_demo_folder_refuses_a_rerun_with_other_settings(smoke_demo, smoke_config) -> None:
    """Its finished runs would be reused under a report that names the new options: refused before any work."""
    from demist.errors import DemistError

    plan, report = smoke_demo
    stamp = report.stat().st_mtime_ns
    with pytest.raises(DemistError, match=r"other settings \(max_steps 2 → None\)"):
        run_demo(dataclasses.replace(plan, max_steps=None), smoke_config, device="cpu")
    other = smoke_config.replace(sampling=dataclasses.replace(smoke_config.sampling, steps=4))
    with pytest.raises(DemistError, match=r"other settings \(config \[sampling\]\)"):
        run_demo(plan, other, device="cpu")
    with pytest.raises(DemistError, match="holds another synthetic cohort"):
        run_demo(dataclasses.replace(plan, subjects=plan.subjects + 1), smoke_config, device="cpu")
    assert report.stat().st_mtime_ns == stamp


def test_a_folder_from_before_split_json_is_checked_against_its_stage1_run(smoke_demo, tmp_path) -> None:
    """A finished demo without split.json: a rerun that would train on other subjects than its Stage-1 run is refused;
    the same split is recorded; a fresh folder records a named split as asked."""
    from demist.errors import DemistError

    plan, _ = smoke_demo
    train, held_out = plan.subject_split()
    old = dataclasses.replace(plan, out=tmp_path / "old")
    old.out.mkdir()
    for part in ("cohort", "runs"):
        (old.out / part).symlink_to(plan.out / part)
    with pytest.raises(DemistError, match=f"trained on {', '.join(train)}; this run would train on"):
        dataclasses.replace(old, held_out_subjects=(train[0],)).record_split()
    assert not old.split_file.exists()
    assert dataclasses.replace(old, held_out_subjects=tuple(held_out)).record_split() == (train, held_out)
    assert json.loads(old.split_file.read_text()) == {"train": train, "held_out": held_out}

    fresh = dataclasses.replace(plan, out=tmp_path / "fresh", held_out_subjects=(train[0],))
    fresh.out.mkdir()
    (fresh.out / "cohort").symlink_to(plan.out / "cohort")
    assert fresh.record_split() == (sorted([*train[1:], *held_out]), [train[0]])
    assert json.loads(fresh.split_file.read_text())["held_out"] == [train[0]]
    fresh.split_file.write_text("{not json")
    with pytest.raises(DemistError, match="split.json: unreadable .*expected"):
        fresh.subject_split()


def test_named_held_out_subjects_are_held_out_and_checked(smoke_demo) -> None:
    """--held-out-subjects holds out exactly the named subjects (duplicates once); an unknown subject, or naming every
    subject, is a clear error."""
    from demist.errors import DemistError
    from demist.workflows.demo import named_split

    plan, _ = smoke_demo
    subjects = sorted({*plan.subject_split()[0], *plan.subject_split()[1]})
    train, test = named_split(plan.manifest, [subjects[-1], subjects[0], subjects[0]])
    assert test == [subjects[0], subjects[-1]] and train == subjects[1:-1]
    assert named_split(plan.manifest, [f" {subjects[0]}"])[1] == [subjects[0]]  # "sub-001, sub-003" as typed
    with pytest.raises(DemistError, match="'sub-099' not in the cohort"):
        named_split(plan.manifest, ["sub-099"])
    with pytest.raises(DemistError, match="3 of 3 subjects named"):
        named_split(plan.manifest, subjects)


def test_demo_command_passes_its_config_file_to_the_demo(tmp_path, monkeypatch) -> None:
    """`demist demo --config FILE` runs the demo with that file's keys on its base preset (the default is tiny)."""
    import typer
    from typer.testing import CliRunner

    import demist.workflows.demo as demo_module
    from demist.cli.workflows import demo

    seen = {}
    monkeypatch.setattr(demo_module, "run_demo", lambda plan, config=None, device="auto":
                        seen.setdefault("config", config) and tmp_path / "report.md")
    toml = tmp_path / "mine.toml"
    toml.write_text('base = "tiny"\n[demist]\nsteps = 7\n')
    app = typer.Typer()
    app.command("demo")(demo)  # a one-command app: its arguments follow directly
    for args, preset, steps in ((["--config", str(toml)], "tiny+mine.toml", 7),
                                ([], "tiny", load_config("tiny").demist.steps)):
        seen.clear()
        result = CliRunner().invoke(app, ["--out", str(tmp_path / "d"), *args])
        assert result.exit_code == 0, result.output
        assert (seen["config"].preset, seen["config"].demist.steps) == (preset, steps)


def test_demo_command_passes_distill_and_held_out_subjects_and_refuses_student_steps_without_distill(
        tmp_path, monkeypatch) -> None:
    import typer
    from typer.testing import CliRunner

    import demist.workflows.demo as demo_module
    from demist.cli.workflows import demo
    from demist.errors import DemistError

    plans = []
    monkeypatch.setattr(demo_module, "run_demo", lambda plan, config=None, device="auto":
                        plans.append(plan) or tmp_path / "report.md")
    app = typer.Typer()
    app.command("demo")(demo)
    result = CliRunner().invoke(app, ["--out", str(tmp_path / "d"), "--distill", "--student-steps", "2"])
    assert result.exit_code == 0, result.output
    assert (plans[0].distill, plans[0].student_steps, plans[0].held_out_subjects) == (True, 2, ())
    result = CliRunner().invoke(app, ["--out", str(tmp_path / "f"), "--held-out-subjects", "sub-004,sub-001"])
    assert result.exit_code == 0 and plans[1].held_out_subjects == ("sub-004", "sub-001")
    plans.pop()
    refused = CliRunner().invoke(app, ["--out", str(tmp_path / "e"), "--student-steps", "2"])
    assert isinstance(refused.exception, DemistError) and "without --distill" in str(refused.exception)
    both = CliRunner().invoke(app, ["--out", str(tmp_path / "g"), "--held-out", "2", "--held-out-subjects", "sub-001"])
    assert isinstance(both.exception, DemistError) and "expected one of them" in str(both.exception)
    typo = CliRunner().invoke(app, ["--out", str(tmp_path / "h"), "--subjects", "6", "--held-out-subjects", "sub-07"])
    assert isinstance(typo.exception, DemistError) and "'sub-07' not in a cohort of 6" in str(typo.exception)
    assert len(plans) == 1 and not (tmp_path / "h").exists()  # refused before the cohort is generated


def test_the_demo_says_its_time_estimate_is_tinys_when_it_runs_another_config(tmp_path) -> None:
    """The up-front estimate is measured for `tiny`; a config file that departs from it is told so, not promised it."""
    from demist.workflows.demo import time_estimate

    toml = tmp_path / "mine.toml"
    toml.write_text('base = "tiny"\n[demist]\nsteps = 7\n')
    assert time_estimate(load_config("tiny"), 12) == "Expect about 12 minutes on 2 CPU cores"
    other = time_estimate(load_config(toml), 12)
    assert "tiny+mine.toml may take longer" in other and "about 12 minutes" in other


def test_the_up_front_estimate_uses_the_bf16_figures_only_with_a_prior_on_a_bf16_cpu() -> None:
    """The figures measured on a CPU with native bf16 cover the demo with the prior; without a prior only the slower
    CPU's were measured, and they stand on any CPU."""
    from demist.workflows.demo import (EXPECTED_MINUTES, EXPECTED_MINUTES_WITH_PRIOR, EXPECTED_MINUTES_WITH_PRIOR_BF16,
                                       expected_minutes)

    assert expected_minutes(prior=False, distill=False, native_bf16=True) == EXPECTED_MINUTES
    assert expected_minutes(prior=True, distill=False, native_bf16=False) == EXPECTED_MINUTES_WITH_PRIOR
    fast = expected_minutes(prior=True, distill=True, native_bf16=True)
    slow = expected_minutes(prior=True, distill=True, native_bf16=False)
    assert {k: v for k, v in fast.items() if k != "distill"} == EXPECTED_MINUTES_WITH_PRIOR_BF16
    assert sum(fast.values()) < sum(slow.values()) / 2 and fast["distill"] < slow["distill"]
    assert "distill" not in expected_minutes(prior=True, distill=False, native_bf16=True)
