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
from demist.demo import DemoPlan, run_demo


@pytest.fixture(scope="module")
def smoke_config():
    cfg = load_config("tiny")
    return cfg.replace(
        data=dataclasses.replace(cfg.data, patch_size=(32, 32, 32)),
        sampling=dataclasses.replace(cfg.sampling, steps=3),
        evaluation=dataclasses.replace(cfg.evaluation, bootstrap=50),
    )


def minutes_cells(report: str) -> list[str]:
    lines = report.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| cohort |"))
    return [cell.strip() for cell in lines[header + 2].strip("|").split("|")]


def test_demo_runs_end_to_end_and_resumes(tmp_path, smoke_config, caplog):
    plan = DemoPlan(out=tmp_path / "demo", subjects=3, held_out=1, seed=3, max_steps=2)
    report = run_demo(plan, smoke_config, device="cpu")
    text = report.read_text()
    assert "## Verdict" in text and "ridge" in text and "demist" in text
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

    timings = json.loads((plan.out / "timings.json").read_text())
    assert set(timings) == {"cohort", "stage1", "backbone", "demist", "ridge", "synthesis", "evaluation"}

    stamp = first.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="demist.demo"):
        again = run_demo(plan, smoke_config, device="cpu").read_text()
    assert first.stat().st_mtime_ns == stamp  # nothing re-synthesized
    # the rerun reports the minutes recorded when each training step ran
    assert minutes_cells(again)[:5] == minutes_cells(text)[:5] == [f"{timings[k]:.1f}" for k in
                                                                    ("cohort", "stage1", "backbone", "demist", "ridge")]
    assert "stage1 already done" in caplog.text and "demist already done" in caplog.text
