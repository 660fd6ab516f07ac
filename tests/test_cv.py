"""`demist cv` end to end with the fast methods: folds, tables, timings, and resuming after an interruption."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from helpers import ellipsoid_session, write_session
from demist.config import load_config
from demist.errors import DemistError
from demist.workflows.cv import CVPlan, run_cv
from demist.data.manifest import write_manifest
from demist.methods import METHODS, Method

CONFIG = load_config("tiny", overrides={"evaluation": {"bootstrap": 10}})


class Interrupted(Exception):
    pass


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    rows = []
    for i, subject in enumerate(["s1", "s2", "s3", "s4"]):
        row = write_session(tmp_path / subject / "a", ellipsoid_session(shape=(24, 26, 22), seed=i))
        rows.append({"subject": subject, "session": "a", "group": "MS" if i % 2 else "HC", **row})
    return write_manifest(tmp_path / "manifest.csv", rows)


def counting(name: str, calls: list[str], fail_on: int | None = None) -> Method:
    """METHODS[name] that records each training call and raises on call number `fail_on`."""
    original = METHODS[name]

    def train(job):
        calls.append(f"{name}:{Path(job.out).parent.parent.name}")
        if len(calls) == fail_on:
            raise Interrupted
        original.train(job)

    return dataclasses.replace(original, train=train)


def test_an_interrupted_cv_resumes_with_what_is_unfinished(manifest, tmp_path):
    out = tmp_path / "cv"
    calls: list[str] = []
    with pytest.raises(Interrupted):  # the fourth training (fold 1's constant) fails
        run_cv(manifest, out, [counting("ridge", calls), counting("constant", calls, fail_on=4)], CONFIG, folds=3)
    splits = (out / "splits.json").read_text()
    assert calls == ["ridge:fold-0", "constant:fold-0", "ridge:fold-1", "constant:fold-1"]
    assert not (out / "table.md").exists()

    calls.clear()
    table = run_cv(manifest, out, [counting("ridge", calls), counting("constant", calls)], CONFIG, folds=3)
    assert calls == ["constant:fold-1", "ridge:fold-2", "constant:fold-2"]  # finished runs are not retrained
    assert (out / "splits.json").read_text() == splits
    text = table.read_text()
    assert "ridge" in text and "constant" in text and "psnr" in text.lower()
    timings = json.loads((out / "fold-2" / "timings.json").read_text())
    assert {"train ridge", "train constant", "synthesize ridge", "synthesize constant"} <= set(timings)
    assert all(minutes >= 0 for minutes in timings.values())
    # a rerun with other settings would mix runs trained two ways in one table: refused, nothing retrained
    calls.clear()
    with pytest.raises(DemistError, match=r"other settings \(max_steps None → 2\)"):
        run_cv(manifest, out, [counting("ridge", calls)], CONFIG, folds=3, max_steps=2)
    other = CONFIG.replace(data=dataclasses.replace(CONFIG.data, psr_range=0.3))
    with pytest.raises(DemistError, match=r"other settings \(config \[data\]\)"):
        run_cv(manifest, out, [counting("ridge", calls)], other, folds=3)
    assert calls == []


def test_a_method_trains_with_its_own_config_and_an_ablation_with_its_methods(manifest, tmp_path):
    seen: dict[str, object] = {}

    def recording(name: str) -> Method:
        original = METHODS[name]

        def train(job):
            seen[name] = job.config
            original.train(job)
        return dataclasses.replace(original, train=train)

    own = load_config("tiny", overrides={"evaluation": {"bootstrap": 10}, "baselines": {"steps": 7}})
    run_cv(manifest, tmp_path / "cv", [recording("ridge"), recording("constant")], CONFIG, folds=2, fold=0,
           method_configs={"ridge": own})
    assert seen["ridge"] is own and seen["constant"] is CONFIG
    plan = CVPlan(manifest, tmp_path, [], CONFIG, None, "cpu", None, {"demist": own})
    assert plan.config_of(METHODS["demist-no-lora"]) is own and plan.config_of(METHODS["ftldm"]) is CONFIG
    with pytest.raises(DemistError, match="method configs for klgan: not among the methods"):
        run_cv(manifest, tmp_path / "cv2", [METHODS["ridge"]], CONFIG, folds=2, method_configs={"klgan": own})


def test_cv_table_has_the_lesion_auc_and_never_tests_against_a_reference_row(tmp_path):
    import csv

    from demist.workflows.cv import write_cv_tables

    rows = []
    for fold in range(2):
        for i in range(3):
            for method, psnr in (("demist", 24.0 + i), ("ridge", 23.0 + i), ("ae-ceiling", 29.0 + i)):
                rows.append({"method": method, "subject": f"s{fold}{i}", "session": "a", "group": "MS",
                             "fold": fold, "psnr": psnr + 0.1 * fold, "ssim": 0.8, "mse": 0.01, "l1": 0.05,
                             "ncc": 0.9})
    lesion_auc = {0: {"oracle": 0.96, "demist": 0.80, "ridge": 0.97}, 1: {"oracle": 0.94, "demist": 0.84}}
    text = write_cv_tables(tmp_path, rows, lesion_auc).read_text()
    assert "| demist | 0.820 ± 0.028 | 2 |" in text and "| ridge | 0.970 | 1 |" in text
    with open(tmp_path / "table.csv", newline="") as fh:
        tests = {(r["method"], r["metric"]): r for r in csv.DictReader(fh)}
    assert tests[("demist", "psnr")]["vs"] == "ridge" and tests[("ridge", "psnr")]["vs"] == "demist"
    assert tests[("ae-ceiling", "psnr")]["vs"] == ""  # scored and shown, but not a method to test
    assert "| ae-ceiling |" in text


def test_folds_run_as_separate_processes_and_collected_give_the_same_table(manifest, tmp_path):
    import subprocess
    import sys

    from demist.methods import parse_methods

    single = run_cv(manifest, tmp_path / "single", parse_methods("ridge"), CONFIG, folds=2)
    demist = str(Path(sys.executable).parent / "demist")
    base = [demist, "cv", "--manifest", str(manifest), "--out", str(tmp_path / "split"), "--methods", "ridge",
            "--folds", "2", "--device", "cpu"]
    collect = [demist, "cv", "--out", str(tmp_path / "split"), "--collect"]
    first = subprocess.run(base + ["--fold", "0"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    early = subprocess.run(collect, capture_output=True, text=True)  # fold 1 has not run yet
    assert early.returncode == 2 and "fold(s) 1 of 2 not finished" in early.stderr and "K in 1 first" in early.stderr
    assert not (tmp_path / "split" / "table.md").exists()
    second = subprocess.run(base + ["--fold", "1"], capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    merged = subprocess.run(collect, capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert (tmp_path / "split" / "table.md").read_text() == single.read_text()
    assert (tmp_path / "split" / "per_session.csv").read_text() == (tmp_path / "single" / "per_session.csv").read_text()
    wrong = subprocess.run(base + ["--fold", "2"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "--fold 2: expected a fold from 0 to 1" in wrong.stderr


def test_demist_in_a_fold_brings_its_reference_rows_and_the_mean_of_k_samples(manifest, tmp_path):
    import nibabel as nib
    import numpy as np

    from demist.methods import parse_methods

    smoke = CONFIG.replace(data=dataclasses.replace(CONFIG.data, patch_size=(32, 32, 32)),
                           sampling=dataclasses.replace(CONFIG.sampling, steps=2, tile_size=(8, 8, 8)))
    summary = run_cv(manifest, tmp_path / "cv", parse_methods("demist"), smoke, folds=2, fold=0, max_steps=2,
                     prior="embedded", device="cpu", mean_samples=2)
    scored = json.loads(summary.read_text())["methods"]
    assert {"demist", "demist-mean2", "ae-ceiling", "aligned-condition"} <= set(scored)
    predictions = tmp_path / "cv" / "fold-0" / "predictions"
    single = sorted((predictions / "demist").rglob("psr.nii.gz"))
    assert single
    for path in single:
        mean = nib.load(predictions / "demist-mean2" / path.relative_to(predictions / "demist"))
        one = nib.load(path)
        assert np.array_equal(mean.affine, one.affine) and mean.shape == one.shape
        assert not np.array_equal(mean.get_fdata(), one.get_fdata())  # two samples averaged, not the first one again
    timings = json.loads((tmp_path / "cv" / "fold-0" / "timings.json").read_text())
    assert "synthesize demist-mean2" in timings
