"""`demist phantom --raw` and `demist preprocess`: raw sessions that can be scored, and the preprocessing that
recovers the clean session from them (brain mask, FLAIR → T1w transform, native grid), alone and in a batch."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from demist.batch_log import BatchSummary
from demist.data.manifest import load_manifest, write_manifest
from demist.data.phantom import add_raw_sessions, generate_cohort
from demist.data.phantom.raw import ROTATION_DEG, TRANSLATION_MM, flair_slice_factor, read_transform
from demist.data.preprocess import MIN_ZERO_BACKGROUND
from demist.errors import DemistError
from demist.preprocessing.steps import resample_onto, transform_from_ants

HAS_TOOLS = all(__import__("importlib").util.find_spec(m) for m in ("ants", "deepbet"))
needs_tools = pytest.mark.skipif(not HAS_TOOLS, reason="the preprocess extra (antspyx, deepbet) is not installed")


@pytest.fixture(scope="module")
def raw_cohort(tmp_path_factory):
    """One subject at 2 mm, clean and raw."""
    root = tmp_path_factory.mktemp("raw") / "cohort"
    generate_cohort(root, 1, spacing=2.0, seed=5, progress=False)
    return root, add_raw_sessions(root, seed=5, progress=False)


def brain_displacement(estimate: np.ndarray, truth: np.ndarray, brain: nib.Nifti1Image) -> np.ndarray:
    """How far (mm) the estimated transform puts each brain voxel from where the true one does."""
    points = brain.affine @ np.c_[np.argwhere(np.asarray(brain.dataobj) > 0), np.ones(int(np.sum(brain.dataobj)))].T
    return np.linalg.norm((estimate @ points - truth @ points)[:3], axis=0)


def test_raw_session_is_a_head_with_a_moved_thick_slice_flair(raw_cohort):
    root, raw_manifest = raw_cohort
    clean, raw = load_manifest(root / "manifest.csv")[0], load_manifest(raw_manifest)[0]
    raw_t1w, raw_flair = nib.load(raw.t1w), nib.load(raw.flair)
    assert np.array_equal(raw_t1w.affine, nib.load(clean.t1w).affine)  # the T1w keeps the clean grid
    assert raw.psr == clean.psr and raw.brain_mask == clean.brain_mask  # so the clean targets stay valid
    assert np.mean(np.asarray(raw_t1w.dataobj) == 0) < MIN_ZERO_BACKGROUND  # not skull-stripped: a head, and noise
    zooms = raw_flair.header.get_zooms()
    assert zooms[2] == pytest.approx(2.0 * flair_slice_factor(2.0)) and zooms[0] == pytest.approx(2.0)

    truth = read_transform(Path(raw.t1w).parent / "transform.json")
    rotation = truth[:3, :3]
    assert np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-6) and np.linalg.det(rotation) == pytest.approx(1)
    angle = np.degrees(Rotation.from_matrix(rotation).magnitude())
    assert ROTATION_DEG[0] - 1e-6 <= angle <= ROTATION_DEG[1] + 1e-6
    shift = brain_displacement(truth, np.eye(4), nib.load(clean.brain_mask))
    assert np.median(shift) > 2.0 and shift.max() >= TRANSLATION_MM[0]  # the brain moved by millimetres

    # The true transform undoes the motion: the raw FLAIR brought back matches the clean FLAIR (up to the bias
    # fields and the thick slices); the identity does not.
    brain = np.asarray(nib.load(clean.brain_mask).dataobj) > 0
    clean_flair = np.asarray(nib.load(clean.flair).dataobj)[brain]
    back = np.asarray(resample_onto(raw_flair, raw_t1w, np.linalg.inv(truth), order=1).dataobj)[brain]
    unmoved = np.asarray(resample_onto(raw_flair, raw_t1w, np.eye(4), order=1).dataobj)[brain]
    recovered, unrecovered = np.corrcoef(back, clean_flair)[0, 1], np.corrcoef(unmoved, clean_flair)[0, 1]
    assert recovered > 0.85 and recovered > unrecovered + 0.1


def test_ants_transforms_are_read_in_ras():
    """ITK keeps LPS points and a centre; a shift of (1, 2, 3) mm in LPS is (-1, -2, 3) in RAS, and a rotation
    about a centre keeps that centre fixed."""
    shift = transform_from_ants(np.r_[np.eye(3).ravel(), 1.0, 2.0, 3.0], np.zeros(3))
    assert np.allclose(shift[:3, 3], [-1.0, -2.0, 3.0]) and np.allclose(shift[:3, :3], np.eye(3))
    rotation = Rotation.from_euler("z", 10, degrees=True).as_matrix()
    centre_lps = np.array([10.0, -20.0, 5.0])
    ras = transform_from_ants(np.r_[rotation.ravel(), 0.0, 0.0, 0.0], centre_lps)
    centre_ras = np.array([-10.0, 20.0, 5.0, 1.0])
    assert np.allclose(ras @ centre_ras, centre_ras)


@pytest.fixture(scope="module")
def preprocessed(raw_cohort, tmp_path_factory):
    """One batch over a manifest of a broken session and the raw phantom session (the tools run once per module)."""
    from demist.preprocessing.batch import preprocess_manifest

    root, raw_manifest = raw_cohort
    work = tmp_path_factory.mktemp("preprocessed")
    good = load_manifest(raw_manifest)[0]
    broken = work / "broken_t1w.nii.gz"
    broken.write_bytes(b"not a nifti")
    rows = [{"subject": "sub-bad", "session": "ses-01", "group": "MS", "t1w": str(broken), "flair": str(good.flair)},
            {"subject": good.subject, "session": good.session, "group": good.group, "t1w": str(good.t1w),
             "flair": str(good.flair), "psr": str(good.psr), "brain_mask": str(good.brain_mask),
             "lesion_mask": str(good.lesion_mask)}]
    manifest = write_manifest(work / "mixed.csv", rows)
    summary, written = preprocess_manifest(manifest, work / "out", progress=False)
    return {"raw": good, "summary": summary, "manifest": written, "input": manifest, "out": work / "out"}


@needs_tools
def test_preprocessing_recovers_the_mask_and_the_transform_on_the_t1w_grid(preprocessed):
    raw, summary = preprocessed["raw"], preprocessed["summary"]
    assert summary.written == [raw.key]
    [done] = load_manifest(preprocessed["manifest"])
    for path in (done.t1w, done.flair, done.brain_mask):  # every output on the T1w's native grid and affine
        image = nib.load(path)
        assert image.shape == nib.load(raw.t1w).shape and np.array_equal(image.affine, nib.load(raw.t1w).affine)
    assert done.psr == raw.psr  # targets are carried over: they live on the same grid

    truth_mask = np.asarray(nib.load(raw.brain_mask).dataobj) > 0
    mask = np.asarray(nib.load(done.brain_mask).dataobj) > 0
    assert 2 * (mask & truth_mask).sum() / (mask.sum() + truth_mask.sum()) >= 0.95
    estimate = np.array(json.loads((Path(done.t1w).parent / "flair_to_t1w.json").read_text())["flair_to_t1w_ras"])
    truth = read_transform(Path(raw.t1w).parent / "transform.json")
    assert brain_displacement(estimate, truth, nib.load(raw.brain_mask)).max() < 1.0
    assert np.degrees(Rotation.from_matrix(estimate[:3, :3] @ truth[:3, :3].T).magnitude()) < 1.0
    assert not list(preprocessed["out"].rglob(".demist-preprocess-*"))  # no staging left behind


@needs_tools
def test_a_bad_session_fails_alone_is_logged_and_the_batch_resumes(preprocessed):
    from demist.preprocessing.batch import LOG_NAME, preprocess_manifest

    raw, summary = preprocessed["raw"], preprocessed["summary"]
    assert list(summary.failed) == ["sub-bad/ses-01"] and "broken_t1w" in summary.failed["sub-bad/ses-01"]
    assert [r.key for r in load_manifest(preprocessed["manifest"])] == [raw.key]
    with open(preprocessed["out"] / LOG_NAME, newline="") as fh:
        log = list(csv.reader(fh))
    assert [row[:2] for row in log] == [["session", "status"], ["sub-bad/ses-01", "failed"], [raw.key, "written"]]
    assert not (preprocessed["out"] / "sub-bad").exists() or not any((preprocessed["out"] / "sub-bad").rglob("*.gz"))
    again, _ = preprocess_manifest(preprocessed["input"], preprocessed["out"], progress=False)
    assert again.skipped == [raw.key] and not again.written and list(again.failed) == ["sub-bad/ses-01"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "demist"), *args], capture_output=True, text=True)


@pytest.mark.parametrize("args,message", [
    (["--t1w", "a.nii.gz"], "one session needs both --t1w and --flair"),
    (["--t1w", "a.nii.gz", "--flair", "b.nii.gz", "--manifest", "m.csv"], "one form"),
    ([], "got no input; expected one form"),
    (["--bids", "b"], "--out-dir: not with --bids, which writes DIR/derivatives/demist"),
    (["--t1w", ".", "--flair", "b.nii.gz"], "--t1w .: is a directory"),
])
def test_preprocess_refuses_bad_arguments_in_one_line(tmp_path, args, message):
    result = run_cli("preprocess", "--out-dir", str(tmp_path / "out"), *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_extra_is_named(monkeypatch):
    import importlib

    from demist.preprocessing import tools

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name == "ants" else real(name, *a))
    with pytest.raises(DemistError, match=r"pip install 'demist\[preprocess\]'"):
        tools.require("ants")


def test_batch_summary_names_what_it_did():
    assert str(BatchSummary(written=["a/b"], verb="preprocessed")).startswith("1 preprocessed, 0 already done")


def test_one_batch_loop_skips_what_is_done_and_survives_any_failure(tmp_path):
    from demist.batch_log import run_batch, write_batch_log

    done_before, worked = {"b"}, []

    def work(item: str) -> None:
        if item == "c":
            raise DemistError("c.nii.gz: not a 3D image")
        if item == "d":
            raise RuntimeError("ITK: cannot allocate\nsecond line")
        worked.append(item)

    summary = run_batch(["a", "b", "c", "d", "e"], key=str.upper, done=done_before.__contains__, work=work,
                        summary=BatchSummary(), desc="test", progress=False)
    assert worked == ["a", "e"] and summary.written == ["A", "E"] and summary.skipped == ["B"]
    assert summary.failed == {"C": "c.nii.gz: not a 3D image", "D": "RuntimeError: ITK: cannot allocate"}
    log = write_batch_log(tmp_path / "log.csv", summary, ["A", "B", "C", "D", "E"]).read_text().splitlines()
    assert [row.split(",")[1] for row in log[1:]] == ["written", "already done", "failed", "failed", "written"]


def bids_dataset(root: Path, raw_manifest: Path, runs: tuple[int, ...] = (1, 2)) -> Path:
    """A BIDS dataset of the raw phantom session: two T1w runs (the second the real one), one FLAIR, and a session
    without FLAIR (skipped)."""
    raw = load_manifest(raw_manifest)[0]
    anat = root / "sub-01" / "ses-01" / "anat"
    anat.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "raw phantom", "BIDSVersion": "1.9.0"}))
    for run in runs:
        source = raw.t1w if run == max(runs) else raw.flair  # a wrong earlier run: must not be chosen
        (anat / f"sub-01_ses-01_run-{run}_T1w.nii.gz").write_bytes(Path(source).read_bytes())
    (anat / "sub-01_ses-01_FLAIR.nii.gz").write_bytes(Path(raw.flair).read_bytes())
    lonely = root / "sub-02" / "ses-01" / "anat"
    lonely.mkdir(parents=True)
    (lonely / "sub-02_ses-01_T1w.nii.gz").write_bytes(Path(raw.t1w).read_bytes())
    return root


def test_bids_sessions_take_the_highest_run_and_need_both_contrasts(raw_cohort, tmp_path):
    pytest.importorskip("bids")
    from demist.preprocessing.bids import DERIVATIVE, find_sessions

    root = bids_dataset(tmp_path / "bids", raw_cohort[1], runs=(1, 2, 10))
    sessions, incomplete = find_sessions(root)
    assert [(s.subject, s.session) for s in sessions] == [("01", "01")]  # sub-02 has no FLAIR: reported
    assert incomplete == {"sub-02/ses-01": "no *_FLAIR.nii[.gz] in its anat/ folder"}
    assert sessions[0].t1w.name == "sub-01_ses-01_run-10_T1w.nii.gz"  # run 10 after run 2: numbers, not names
    files = sessions[0].files(root / DERIVATIVE)
    assert files.flair.name == "sub-01_ses-01_space-T1w_desc-preproc_FLAIR.nii.gz"
    assert files.brain_mask.parent == root / DERIVATIVE / "sub-01" / "ses-01" / "anat"
    with pytest.raises(DemistError, match="dataset_description.json"):
        find_sessions(tmp_path)


@pytest.fixture(scope="module")
def ridge_run(raw_cohort, tmp_path_factory):
    """A model to synthesize with: the ridge floor fitted on the clean phantom (seconds)."""
    run = tmp_path_factory.mktemp("ridge") / "run"
    result = run_cli("train", "ridge", "--manifest", str(raw_cohort[0] / "manifest.csv"), "--out", str(run))
    assert result.returncode == 0, result.stderr
    return run


@needs_tools
def test_bids_in_bids_out_through_synthesis(raw_cohort, ridge_run, tmp_path):
    root = bids_dataset(tmp_path / "bids", raw_cohort[1])
    assert run_cli("synthesize", "--model", str(ridge_run), "--bids", str(root)).returncode == 2  # not preprocessed
    result = run_cli("preprocess", "--bids", str(root))
    assert result.returncode == 1 and "failed sub-02/ses-01: no *_FLAIR" in result.stdout  # reported, skipped
    derivative = root / "derivatives" / "demist"
    assert "sub-02/ses-01,failed,no *_FLAIR" in (derivative / "preprocess_log.csv").read_text()
    anat = derivative / "sub-01" / "ses-01" / "anat"
    assert sorted(p.name for p in anat.iterdir()) == [
        "sub-01_ses-01_desc-brain_mask.nii.gz", "sub-01_ses-01_desc-preproc_T1w.nii.gz",
        "sub-01_ses-01_from-FLAIR_to-T1w_mode-image_xfm.json", "sub-01_ses-01_from-FLAIR_to-T1w_mode-image_xfm.mat",
        "sub-01_ses-01_space-T1w_desc-preproc_FLAIR.nii.gz"]
    assert json.loads((derivative / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    [record] = load_manifest(derivative / "manifest.csv")
    assert (record.subject, record.session) == ("sub-01", "ses-01") and record.brain_mask.parent == anat

    result = run_cli("synthesize", "--model", str(ridge_run), "--bids", str(root))
    assert result.returncode == 0, result.stderr
    psr = anat / "sub-01_ses-01_desc-demist_PSRmap.nii.gz"
    raw_t1w = nib.load(load_manifest(raw_cohort[1])[0].t1w)
    assert np.array_equal(nib.load(psr).affine, raw_t1w.affine) and nib.load(psr).shape == raw_t1w.shape
    sidecar = json.loads((anat / "sub-01_ses-01_desc-demist_PSRmap.json").read_text())
    assert sidecar["ModelRun"] == str(ridge_run.resolve()) and "DemistVersion" in sidecar
    assert "sub-01/ses-01,written," in (derivative / "synthesis_log.csv").read_text()


@needs_tools
def test_synthesize_preprocess_takes_a_raw_scan_and_writes_on_its_grid(raw_cohort, ridge_run, tmp_path):
    raw = load_manifest(raw_cohort[1])[0]
    out = tmp_path / "psr.nii.gz"
    result = run_cli("synthesize", "--model", str(ridge_run), "--t1w", str(raw.t1w), "--flair", str(raw.flair),
                     "-o", str(out), "--preprocess")
    assert result.returncode == 0, result.stderr
    assert np.array_equal(nib.load(out).affine, nib.load(raw.t1w).affine)
    plain = run_cli("synthesize", "--model", str(ridge_run), "--t1w", str(raw.t1w), "--flair", str(raw.flair),
                    "-o", str(tmp_path / "refused.nii.gz"))
    assert plain.returncode == 2 and "skull-stripped" in plain.stderr  # without --preprocess, a raw head is refused
    assert not (tmp_path / "refused.nii.gz").exists()


@needs_tools
def test_a_raw_batch_over_two_processes_is_preprocessed_by_one(raw_cohort, ridge_run, tmp_path):
    """Under `accelerate launch` the main process alone preprocesses the raw sessions (each process would otherwise
    redo every one into the same folder); all of them then synthesize from what it wrote."""
    import os
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                str(port)]
    demist = str(Path(sys.executable).parent / "demist")
    result = subprocess.run([*launcher, demist, "synthesize", "--model", str(ridge_run), "--manifest",
                             str(raw_cohort[1]), "--out-dir", str(tmp_path / "out"), "--preprocess", "--device", "cpu"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    records = load_manifest(raw_cohort[1])
    assert result.stdout.count(f"{len(records)} preprocessed, 0 already done, 0 failed") == 1, result.stdout
    for raw in records:
        psr = nib.load(tmp_path / "out" / raw.subject / raw.session / "psr.nii.gz")
        assert np.array_equal(psr.affine, nib.load(raw.t1w).affine)


def nifti(path: Path, data: np.ndarray, spacing: float = 2.0, shift_mm: float = 0.0) -> Path:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[0, 3] = shift_mm
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
    return path


@pytest.mark.parametrize("case", ["localizer", "other_head", "unreadable"])
def test_preprocess_refuses_unusable_scans_in_one_line_and_writes_nothing(raw_cohort, tmp_path, case):
    raw = load_manifest(raw_cohort[1])[0]
    t1w, flair = raw.t1w, raw.flair
    if case == "localizer":
        flair = nifti(tmp_path / "localizer.nii.gz", np.ones((128, 128, 3)))
        message = "not a localizer"
    elif case == "other_head":  # a scan whose field of view lies a metre away
        flair = nifti(tmp_path / "far.nii.gz", np.ones((96, 96, 96)), shift_mm=1000.0)
        message = "expected two scans of the same head"
    else:
        flair = tmp_path / "flair.nii.gz"
        flair.write_bytes(b"\x1f\x8b garbage")
        message = "flair"
    out = tmp_path / "out"
    result = run_cli("preprocess", "--t1w", str(t1w), "--flair", str(flair), "--out-dir", str(out))
    if not HAS_TOOLS:
        assert result.returncode == 2 and "demist[preprocess]" in result.stderr
        return
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() or not any(out.rglob("*.nii.gz"))


@needs_tools
def test_brain_extraction_that_finds_no_brain_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    noise = nifti(tmp_path / "noise.nii.gz", rng.random((90, 100, 90)) * 0.05)
    result = run_cli("preprocess", "--t1w", str(noise), "--flair", str(noise), "--out-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "brain" in result.stderr and "Traceback" not in result.stderr
    assert not any((tmp_path / "out").rglob("*.nii.gz"))


def test_the_psr_map_goes_beside_a_preprocessed_t1w_and_nothing_else():
    from demist.preprocessing.bids import psr_map_beside

    folder = Path("derivatives/demist/sub-01/ses-a/anat")
    beside = psr_map_beside(folder / "sub-01_ses-a_desc-preproc_T1w.nii.gz")
    assert beside == folder / "sub-01_ses-a_desc-demist_PSRmap.nii.gz"
    with pytest.raises(DemistError, match="not a preprocessed T1w of the derivative"):
        psr_map_beside(folder / "sub-01_ses-a_T1w.nii.gz")  # its own name would have come back: the T1w overwritten
