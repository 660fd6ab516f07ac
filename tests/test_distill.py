"""`demist train distill`: the student's loss, its timesteps, and a student run trained from a tiny DEMIST teacher
that synthesis picks up with the student's sampler (CPU, two hand-made sessions)."""

from __future__ import annotations

import pytest
import torch
import typer
from typer.testing import CliRunner

from helpers import LATENT_OVERRIDES, Interrupted, interrupt_latent_batches
from demist.cli.distill import distill_command
from demist.config import load_config
from demist.diffusion.samplers import sample_dpmpp_2m
from demist.diffusion.schedule import NoiseSchedule
from demist.errors import DemistError
from demist.methods import load_synthesizer
from demist.runs import read_run, sha256_file
from demist.training.distill import distillation_loss, student_timesteps, teacher_trajectory, train_distill
from demist.training.stage2 import train_demist

CFG = load_config("tiny", overrides={**LATENT_OVERRIDES,
                                     "demist": {**LATENT_OVERRIDES["demist"], "controlnet_hint": "latent"},
                                     "distill": {"steps": 2, "batch_size": 2}})
SCHEDULE = NoiseSchedule.from_config(CFG.diffusion)


@pytest.fixture(scope="module")
def teacher(latent_cohort):
    return train_demist(latent_cohort["manifest"], latent_cohort["stage1"].path, latent_cohort["backbone"].path, CFG,
                        latent_cohort["root"] / "teacher", device="cpu")


def test_a_student_step_that_lands_on_the_teacher_costs_nothing():
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 8, 4, 4, 4, generator=generator), torch.randn(2, 8, 4, 4, 4, generator=generator)
    t, t_next = torch.tensor([999, 666]), torch.tensor([666, -1])  # the second sample takes a last step (to x0)
    x_t = SCHEDULE.add_noise(x0, eps, t)
    target = torch.stack([SCHEDULE.add_noise(x0, eps, torch.tensor([666, 666]))[0], x0[1]])
    assert distillation_loss(x0, x_t, t, t_next, target, SCHEDULE) < 1e-10  # x0-prediction, exactly right
    assert distillation_loss(x0 + 0.1, x_t, t, t_next, target, SCHEDULE) > 1e-4


def test_the_student_timesteps_must_be_among_the_teachers():
    student, teacher = student_timesteps(CFG, SCHEDULE)  # tiny: DPM-Solver++ with 10 steps, student 4
    assert student == [999, 666, 333, 0] and set(student) <= set(teacher)
    three = CFG.replace(distill=CFG.distill.__class__(3, 2, 2, 1e-4))
    with pytest.raises(DemistError, match=r"distill.student_steps\) 3: .* expected one of \[1, 2, 4, 10\]"):
        student_timesteps(three, SCHEDULE)


def test_the_trajectory_is_the_teachers_own_sample():
    def model(x, t):
        return 0.5 * x  # any deterministic x0-predictor

    x_T = torch.randn(1, 8, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    path = teacher_trajectory(model, x_T, SCHEDULE, CFG, [999, 666, 333, 0])
    assert sorted(path) == [-1, 0, 333, 666, 999] and torch.equal(path[999], x_T)
    assert torch.equal(path[-1], sample_dpmpp_2m(model, x_T, SCHEDULE, 10))


def test_a_student_run_is_a_demist_run_that_samples_in_its_own_steps(latent_cohort, teacher, tmp_path):
    backbone_file = latent_cohort["backbone"].path / "unet.safetensors"
    before = sha256_file(backbone_file)
    student = train_distill(teacher.path, tmp_path / "student", device="cpu")
    assert sha256_file(backbone_file) == before  # the frozen backbone is never written
    assert (student.method, student.stage) == (teacher.method, "demist")
    assert {role: p["sha256"] for role, p in student.parents.items()} == {
        "stage1": teacher.parents["stage1"]["sha256"], "backbone": teacher.parents["backbone"]["sha256"],
        "teacher": teacher.run_json_sha256}
    assert (student.config.sampling.sampler, student.config.sampling.steps) == ("ddim", 4)
    assert student.training["teacher_sampler"] == "dpm++-10" and student.training["student_timesteps"] == [999, 666,
                                                                                                              333, 0]
    ours, theirs = student.weights("streams"), teacher.weights("streams")
    assert ours.keys() == theirs.keys() and any(not torch.equal(ours[k], theirs[k]) for k in ours)  # it trained
    assert student.metrics["sample_mse_to_teacher_before"] > 0
    synthesizer = load_synthesizer(student.path, device="cpu")
    assert (synthesizer.sampler, synthesizer.steps) == ("ddim", 4)


def test_distill_through_the_command_line_and_refusals(latent_cohort, teacher, tmp_path):
    app = typer.Typer()
    app.command("distill")(distill_command)
    app.command("unused")(lambda: None)  # two commands, so the name "distill" is part of the invocation
    result = CliRunner().invoke(app, ["distill", "--teacher", str(teacher.path), "--out", str(tmp_path / "s"),
                                      "--student-steps", "2", "--max-steps", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "samples with ddim-2 (teacher dpm++-10)" in result.output
    assert read_run(tmp_path / "s").training["steps"] == 1
    with pytest.raises(DemistError, match="--teacher .*: is a 'backbone' run; expected 'demist'"):
        train_distill(latent_cohort["backbone"].path, tmp_path / "x", device="cpu")
    assert not (tmp_path / "x").exists()


def test_an_interrupted_distillation_resumes_to_the_same_student(latent_cohort, teacher, tmp_path, monkeypatch):
    from demist.training.checkpoint import latest_checkpoint

    cfg_steps = {"max_steps": 3, "device": "cpu"}
    whole = train_distill(teacher.path, tmp_path / "whole", **cfg_steps)
    interrupt_latent_batches(monkeypatch, at_step=2)
    with pytest.raises(Interrupted):
        train_distill(teacher.path, tmp_path / "resumed", **cfg_steps)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-00000002"
    monkeypatch.undo()
    resumed = train_distill(teacher.path, tmp_path / "resumed", resume=True, **cfg_steps)
    a, b = whole.weights("streams"), resumed.weights("streams")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_teacher_that_sees_the_image_is_distilled_and_its_agreement_measured(latent_cohort, tmp_path):
    """With the image hint both nets get the evaluation patches' T1w + FLAIR, so the agreement is a number."""
    cfg = load_config("tiny", overrides={**LATENT_OVERRIDES, "distill": {"steps": 1, "batch_size": 2}})
    assert cfg.demist.uses_image_hint
    image_teacher = train_demist(latent_cohort["manifest"], latent_cohort["stage1"].path,
                                 latent_cohort["backbone"].path, cfg, tmp_path / "teacher", device="cpu")
    student = train_distill(image_teacher.path, tmp_path / "student", student_steps=1, device="cpu")
    before, after = (student.metrics[f"sample_mse_to_teacher_{k}"] for k in ("before", "after"))
    assert 0 < before < float("inf") and 0 <= after < float("inf")


def test_a_teacher_whose_sampler_is_not_the_plain_one_is_refused(teacher):
    """The student learns the plain sampler's landing points: a teacher that starts from z_c or anchors is refused."""
    import dataclasses

    from demist.training.distill import student_config

    for change, message in (({"anchor_sigma": 1.0}, "anchors its samples"), ({"start_strength": 0.5}, "noised z_c")):
        config = teacher.config.replace(sampling=dataclasses.replace(teacher.config.sampling, **change))
        with pytest.raises(DemistError, match=message):
            student_config(dataclasses.replace(teacher, config=config), None, None)
    assert student_config(teacher, None, None).distill == teacher.config.distill
