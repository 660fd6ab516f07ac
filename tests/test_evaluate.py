"""`evaluate_predictions` and `demist evaluate` on a hand-made two-subject manifest (one patient, one control)."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from helpers import ellipsoid_session, write_session
from demist.cli.evaluate import evaluate_command, parse_prediction_dirs
from demist.data.manifest import write_manifest
from demist.data.nifti import save_image
from demist.errors import DemistError
from demist.evaluation.evaluate import evaluate_predictions

SHAPE = (40, 44, 36)
VOXEL_MM = 2.0
# Lesion centres in the ellipsoid's [-1, 1] coordinates: inside the WM core, not mirror images of each other.
LESIONS = ((0.22, 0.10, 0.0), (-0.15, -0.20, 0.10), (0.17, 0.0, -0.30))
NOISE_PSR = 0.005


def patient_session(seed: int) -> dict[str, nib.Nifti1Image]:
    """helpers' ellipsoid head with three WM lesions of different depth (PSR 40–70 % of WM)."""
    images = ellipsoid_session(SHAPE, seed=seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    brain = np.asarray(images["brain_mask"].dataobj) > 0
    psr = np.asarray(images["psr"].dataobj).copy()
    psr[np.asarray(images["lesion_mask"].dataobj) > 0] = 0.11  # drop the helpers' lesion; ours replace it
    lesion = np.zeros(SHAPE, dtype=bool)
    for centre, depth in zip(LESIONS, (0.4, 0.55, 0.7)):
        blob = np.sqrt(((grid - np.array(centre)[:, None, None, None]) ** 2).sum(axis=0)) < 0.11
        psr[blob] = 0.11 * depth
        lesion |= blob
    affine = images["psr"].affine
    images["psr"] = nib.Nifti1Image((psr * brain).astype(np.float32), affine)
    images["lesion_mask"] = nib.Nifti1Image(lesion.astype(np.uint8), affine)
    return images


def control_session(seed: int) -> dict[str, nib.Nifti1Image]:
    images = ellipsoid_session(SHAPE, seed=seed)
    images["lesion_mask"] = nib.Nifti1Image(np.zeros(SHAPE, np.uint8), images["psr"].affine)
    return images


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, Path]:
    """Manifest (patient ms1 with sessions a, b and a meta.json plane; control hc1) and prediction folders."""
    root = tmp_path_factory.mktemp("cohort")
    centre_mm = (np.array(SHAPE) - 1) / 2 * VOXEL_MM
    plane = {"point": centre_mm.tolist(), "normal": [1.0, 0.0, 0.0]}
    rows, truths = [], {}
    for subject, session, group, images in [("ms1", "a", "MS", patient_session(0)), ("ms1", "b", "MS",
                                            patient_session(1)), ("hc1", "a", "HC", control_session(2))]:
        folder = root / subject / session
        row = write_session(folder, images)
        if group == "MS":
            (folder / "meta.json").write_text(json.dumps({"midsagittal_plane": plane}))
            row["meta"] = str(folder / "meta.json")
        rows.append({"subject": subject, "session": session, "group": group, **row})
        truths[(subject, session)] = images["psr"]
    rng = np.random.default_rng(0)
    for (subject, session), truth in truths.items():
        noisy = np.asarray(truth.dataobj) + rng.normal(0, NOISE_PSR, SHAPE)
        save_image(truth, root / "perfect" / subject / session / "psr.nii.gz")
        save_image(nib.Nifti1Image(noisy.astype(np.float32), truth.affine),
                   root / "noisy" / subject / session / "psr.nii.gz")
    return {"root": root, "manifest": write_manifest(root / "manifest.csv", rows)}


@pytest.fixture(scope="module")
def evaluated(cohort) -> tuple[dict, Path]:
    out = cohort["root"] / "evaluation"
    summary = evaluate_predictions(cohort["manifest"], {"perfect": cohort["root"] / "perfect",
                                                        "noisy": cohort["root"] / "noisy"},
                                   out, bootstrap=200, progress=False)
    return summary, out


def _strict_json(text: str) -> dict:
    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_files_are_written(evaluated):
    _, out = evaluated
    for name in ("roc.png", "qualitative.png", "error_map.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["per_session.csv", "summary.json", "report.md", "roc.png", "qualitative.png", "error_map.png"])


def test_perfect_prediction_scores_perfectly(evaluated):
    summary, out = evaluated
    with open(out / "per_session.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and {r["group"] for r in rows} == {"MS", "HC"}
    for row in (r for r in rows if r["method"] == "perfect"):
        assert float(row["mse"]) == 0 and float(row["l1"]) == 0 and row["psnr"] == "inf"
        assert float(row["ssim"]) == pytest.approx(1.0, abs=1e-9) and float(row["ncc"]) == pytest.approx(1.0)
    lesion = summary["lesion_contrast"]
    oracle, perfect = lesion["auc"]["oracle"], lesion["auc"]["perfect"]
    assert perfect == oracle  # same AUCs, CIs and ROC points
    assert all(value == 0 for value in lesion["bias"]["perfect"].values())
    # only the first session of the patient enters the lesion contrast; the control never does
    assert lesion["sessions"] == ["ms1/a"] and lesion["n_lesions"] == len(LESIONS)
    assert oracle["combined"]["auc"] == 1.0  # lesions at 40-70 % of WM PSR are fully separated


def test_noisy_prediction_numbers_follow_the_noise(evaluated):
    summary, _ = evaluated
    noisy = summary["metrics"]["noisy"]
    expected_mse = (NOISE_PSR / 0.25) ** 2  # metrics run on PSR / psr_range
    assert noisy["mse"]["mean"] == pytest.approx(expected_mse, rel=0.05)
    assert noisy["psnr"]["mean"] == pytest.approx(-10 * math.log10(expected_mse), abs=0.25)
    assert 0.5 < noisy["ssim"]["mean"] < 0.99 and noisy["psnr"]["n_sessions"] == 3
    assert summary["metrics"]["perfect"]["psnr"]["mean"] == math.inf
    bias = summary["lesion_contrast"]["bias"]["noisy"]
    assert abs(bias["lesion"]) < 0.003 and summary["paired_tests"]["mse"]["noisy"]["vs"] == "perfect"
    assert summary["counts"] == {"sessions": {"perfect": 3, "noisy": 3}, "subjects": 2,
                                 "skipped": {"perfect": [], "noisy": []}, "lesion_subjects": 1, "lesions": 3,
                                 "lesions_dropped": {}, "unreadable": {}}


def test_summary_json_is_strict_and_report_states_the_range(evaluated):
    summary, out = evaluated
    saved = _strict_json((out / "summary.json").read_text())
    assert saved["psr_range"] == 0.25 and saved["data_range"] == 1.0
    assert saved["metrics"]["perfect"]["psnr"]["mean"] is None  # infinite: null in strict JSON
    assert saved["metrics"]["noisy"]["mse"]["mean"] == pytest.approx(summary["metrics"]["noisy"]["mse"]["mean"])
    assert "fpr" not in saved["lesion_contrast"]["auc"]["noisy"]["combined"] and "per_session" not in saved
    assert len(summary["per_session"]) == 6 and summary["per_session"][0].keys() >= {"method", "subject", "mse"}
    report = (out / "report.md").read_text()
    assert "fixed physical range 0.25" in report and "data range 1" in report
    assert "| perfect | inf |" in report and "| oracle | 1.000 [—] | — |" in report  # one patient: no CI
    assert "ms1/a" in summary["figures"]["qualitative.png"]  # the largest lesion of the lesion sessions


def test_the_report_says_why_lesions_were_left_out(evaluated):
    from demist.evaluation.report import report_markdown

    summary, _ = evaluated
    counts = {**summary["counts"], "lesions_dropped": {"lesion under 5 voxels": 2, "dNAWM under 5 voxels": 1}}
    some_left_out = report_markdown({**summary, "counts": counts})
    assert "3 lesions (3 more left out: 2 with a lesion under 5 voxels, 1 with a dNAWM under 5 voxels)" in some_left_out
    none_kept = report_markdown({**summary, "counts": counts, "lesion_contrast": None})
    assert "Not computed: every lesion was left out (2 with a lesion under 5 voxels" in none_kept


def test_the_plane_comes_from_meta_json_and_is_estimated_without_it(cohort, tmp_path, monkeypatch):
    import demist.evaluation.evaluate as evaluate_module

    planes = []

    def spy(*args, **kwargs):
        planes.append(kwargs["plane"])
        return real(*args, **kwargs)

    real = evaluate_module.lesion_rois
    monkeypatch.setattr(evaluate_module, "lesion_rois", spy)
    predictions = {"noisy": cohort["root"] / "noisy"}
    evaluate_predictions(cohort["manifest"], predictions, tmp_path / "a", bootstrap=0, progress=False)
    assert planes == [json.loads((cohort["root"] / "ms1/a/meta.json").read_text())["midsagittal_plane"]]
    text = cohort["manifest"].read_text().splitlines()
    no_meta = tmp_path / "manifest.csv"  # the same sessions without the meta column's values
    no_meta.write_text("\n".join([text[0]] + [line.rsplit(",", 1)[0] + "," for line in text[1:]]) + "\n")
    summary = evaluate_predictions(no_meta, predictions, tmp_path / "b", bootstrap=0, progress=False)
    assert planes[1] is None and summary["lesion_contrast"]["n_lesions"] == len(LESIONS)


def test_missing_sessions_are_skipped_and_logged(cohort, tmp_path, caplog):
    partial = tmp_path / "partial" / "ms1" / "a"
    partial.mkdir(parents=True)
    (partial / "psr.nii.gz").write_bytes((cohort["root"] / "noisy/ms1/a/psr.nii.gz").read_bytes())
    with caplog.at_level(logging.WARNING, logger="demist.evaluation"):
        summary = evaluate_predictions(cohort["manifest"], {"partial": tmp_path / "partial"}, tmp_path / "out",
                                       bootstrap=0, progress=False, sessions=["ms1/a", "hc1/a"])
    assert summary["counts"]["sessions"] == {"partial": 1} and summary["counts"]["skipped"] == {"partial": ["hc1/a"]}
    assert any("hc1/a" in record.message for record in caplog.records)


def test_a_prediction_on_another_overlapping_grid_is_resampled(cohort, tmp_path):
    truth = nib.load(cohort["root"] / "ms1/a/psr.nii.gz")
    cropped = np.asarray(truth.dataobj)[2:-2, 3:-1, 1:-2]  # the brain stays inside; the affine follows the crop
    affine = truth.affine @ np.array([[1, 0, 0, 2], [0, 1, 0, 3], [0, 0, 1, 1], [0, 0, 0, 1]])
    save_image(nib.Nifti1Image(cropped, affine), tmp_path / "crop/ms1/a/psr.nii.gz")
    summary = evaluate_predictions(cohort["manifest"], {"crop": tmp_path / "crop"}, tmp_path / "out",
                                   bootstrap=0, progress=False, sessions=["ms1/a"])
    assert summary["metrics"]["crop"]["mse"]["mean"] < 1e-10


def test_a_prediction_of_part_of_the_brain_is_refused(cohort, tmp_path):
    """A map whose field of view leaves most of the brain out (a slab) would be scored against zeros there."""
    truth = nib.load(cohort["root"] / "ms1/a/psr.nii.gz")
    slab = np.asarray(truth.dataobj)[:, :, 10:14]
    affine = truth.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 10], [0, 0, 0, 1]])
    save_image(nib.Nifti1Image(slab, affine), tmp_path / "slab/ms1/a/psr.nii.gz")
    with pytest.raises(DemistError, match=r"slab prediction for ms1/a .*covers \d+\.\d% of the brain; expected"):
        evaluate_predictions(cohort["manifest"], {"slab": tmp_path / "slab"}, tmp_path / "out", progress=False,
                             sessions=["ms1/a"])


def test_a_prediction_elsewhere_in_space_raises(cohort, tmp_path):
    truth = nib.load(cohort["root"] / "ms1/a/psr.nii.gz")
    shifted = truth.affine.copy()
    shifted[:3, 3] += 500.0
    save_image(nib.Nifti1Image(np.asarray(truth.dataobj), shifted), tmp_path / "far/ms1/a/psr.nii.gz")
    for skip in (False, True):  # skipping it leaves the method nothing to score: an error all the same
        match = ("far: no session could be scored .*" if skip else "") + "far prediction for ms1/a.*physical space"
        with pytest.raises(DemistError, match=match):
            evaluate_predictions(cohort["manifest"], {"far": tmp_path / "far"}, tmp_path / "out", progress=False,
                                 skip_unreadable=skip)
    assert not (tmp_path / "out").exists()


def test_one_unreadable_prediction_leaves_one_session_out(cohort, tmp_path):
    """A corrupt file costs its own session for its own method; the rest is scored, listed and exits 1."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(cohort["root"] / "noisy", broken)
    (broken / "ms1/b/psr.nii.gz").write_bytes(b"not a NIfTI")
    out = tmp_path / "cli"
    app = typer.Typer()
    app.command("evaluate")(evaluate_command)
    app.callback()(lambda: None)
    result = CliRunner().invoke(app, ["evaluate", "--manifest", str(cohort["manifest"]), "--pred-dir",
                                      f"broken={broken}", "--pred-dir", f"perfect={cohort['root'] / 'perfect'}",
                                      "--out", str(out)])
    assert result.exit_code == 1 and "1 file(s) not readable" in result.output
    saved = json.loads((out / "summary.json").read_text())
    assert saved["counts"]["sessions"] == {"broken": 2, "perfect": 3}
    assert list(saved["counts"]["unreadable"]) == ["ms1/b"] and "broken" in saved["counts"]["unreadable"]["ms1/b"]
    assert "- Not readable, left out: ms1/b (broken)" in (out / "report.md").read_text()
    assert saved["lesion_contrast"]["sessions"] == ["ms1/a"]  # the patient's first session is still complete


def test_an_unreadable_lesion_mask_costs_only_the_lesion_contrast(cohort, tmp_path):
    """A corrupt optional mask leaves the session's image metrics in (skip mode) and is listed; strict, it raises."""
    with open(cohort["manifest"], newline="") as f:
        rows = list(csv.DictReader(f))
    broken = tmp_path / "lesion_mask.nii.gz"
    broken.write_bytes(b"not a NIfTI")
    original, rows[0]["lesion_mask"] = rows[0]["lesion_mask"], str(broken)  # ms1/a, the patient's first session
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    with pytest.raises(DemistError, match="ms1/a lesion_mask"):
        evaluate_predictions(manifest, {"noisy": cohort["root"] / "noisy"}, tmp_path / "strict", progress=False)
    summary = evaluate_predictions(manifest, {"noisy": cohort["root"] / "noisy"}, tmp_path / "out", progress=False,
                                   skip_unreadable=True)
    assert summary["counts"]["sessions"] == {"noisy": 3}
    assert list(summary["counts"]["unreadable"]) == ["ms1/a"]
    assert list(summary["counts"]["unreadable"]["ms1/a"]) == ["lesion_mask"]
    assert "- Not readable, lesion contrast out: ms1/a (lesion_mask)" in (tmp_path / "out" / "report.md").read_text()
    assert not summary.get("lesion_contrast")  # the patient's first session has no lesions to compare
    assert (tmp_path / "out" / "qualitative.png").is_file()  # drawn on that session, without the lesion outline
    rows[0]["lesion_mask"], rows[2]["lesion_mask"] = original, str(broken)  # now the control's is broken
    manifest = write_manifest(tmp_path / "manifest2.csv", rows)
    summary = evaluate_predictions(manifest, {"noisy": cohort["root"] / "noisy"}, tmp_path / "out2", progress=False)
    assert summary["counts"]["unreadable"] == {} and summary["lesion_contrast"]  # no lesion contrast reads it


@pytest.mark.parametrize("case, message", [
    ("no_files", "empty.*none of the 3 sessions"),
    ("not_a_folder", "ghost.*not a folder"),
    ("reserved_name", "oracle.*reserved"),
    ("reserved_source", "'lesion_mask'.*reserved"),
    ("unknown_session", "ms1/zz.*not in the manifest"),
    ("psr_range", r"psr_range=0\.0; expected a positive PSR value"),
    ("out_is_a_file", "--out .*out: is a file; expected a folder"),
])
def test_bad_arguments_raise(cohort, tmp_path, case, message):
    (tmp_path / "empty").mkdir()
    predictions = {"noisy": cohort["root"] / "noisy"}
    kwargs = {}
    out = tmp_path / "out"
    if case == "out_is_a_file":
        out.write_text("an earlier results file")
    elif case == "no_files":
        predictions["empty"] = tmp_path / "empty"
    elif case == "not_a_folder":
        predictions = {"ghost": tmp_path / "missing"}
    elif case == "reserved_name":
        predictions = {"oracle": cohort["root"] / "noisy"}
    elif case == "reserved_source":  # the name under which an unreadable optional mask is listed
        predictions = {"lesion_mask": cohort["root"] / "noisy"}
    elif case == "unknown_session":
        kwargs = {"sessions": ["ms1/zz"]}
    else:
        kwargs = {"psr_range": 0.0}
    with pytest.raises(DemistError, match=message):
        evaluate_predictions(cohort["manifest"], predictions, out, progress=False, **kwargs)
    assert out.is_file() if case == "out_is_a_file" else not out.exists()  # nothing written on bad input


def test_prediction_dir_arguments():
    assert parse_prediction_dirs(["preds"]) == {"demist": Path("preds")}
    assert parse_prediction_dirs(["preds", "ridge=out/ridge"]) == {"demist": Path("preds"),
                                                                   "ridge": Path("out/ridge")}
    assert parse_prediction_dirs(["runs/lr=1e-3"]) == {"demist": Path("runs/lr=1e-3")}  # not NAME=FOLDER
    for bad in (["a", "b"], ["ridge="], []):
        with pytest.raises(DemistError):
            parse_prediction_dirs(bad)


def test_cli_uses_the_config_and_the_psr_range_option(cohort, tmp_path):
    app = typer.Typer()
    app.command("evaluate")(evaluate_command)
    app.callback()(lambda: None)  # keep "evaluate" a subcommand, as in the demist app
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["evaluate", "--manifest", str(cohort["manifest"]), "--pred-dir",
                                      str(cohort["root"] / "noisy"), "--out", str(out), "--psr-range", "0.5"])
    assert result.exit_code == 0, result.output
    assert "| demist |" in result.output and "fixed physical range 0.5" in result.output
    saved = json.loads((out / "summary.json").read_text())
    assert saved["psr_range"] == 0.5 and saved["ring_mm"] == 4.0 and saved["bootstrap"] == 1000  # tiny preset
    assert saved["metrics"]["demist"]["mse"]["mean"] == pytest.approx((NOISE_PSR / 0.5) ** 2, rel=0.05)


def test_a_session_stored_in_another_axis_order_scores_and_shows_the_same(cohort, tmp_path):
    """The patient's session and a prediction stored with axes permuted and one flipped, on anisotropic voxels (the
    affine to match): the same metrics, lesion AUC and figure slice as the RAS-stored original."""
    def reoriented(image: nib.Nifti1Image) -> nib.Nifti1Image:
        data = np.flip(np.asarray(image.dataobj), axis=0).transpose(2, 0, 1)  # stored axes: S, L, A
        ras = image.affine
        affine = np.zeros((4, 4))
        affine[:3, 0], affine[:3, 1], affine[:3, 2] = ras[:3, 2], -ras[:3, 0], ras[:3, 1]
        affine[:3, 3] = ras[:3, 3] + ras[:3, 0] * (image.shape[0] - 1)
        affine[3, 3] = 1
        return nib.Nifti1Image(data, affine)

    anisotropic = np.diag([1.0, 1.0, 1.5, 1.0])  # z voxels 1.5× taller, in both copies
    root = cohort["root"]
    rows, results = {}, {}
    for name, turn in (("ras", lambda image: image), ("turned", reoriented)):
        images = {key: turn(nib.Nifti1Image(np.asarray(nib.load(root / "ms1/a" / f"{key}.nii.gz").dataobj),
                                            nib.load(root / "ms1/a" / f"{key}.nii.gz").affine @ anisotropic))
                  for key in ("t1w", "flair", "psr", "brain_mask", "lesion_mask", "wm_mask")}
        noisy = nib.load(root / "noisy/ms1/a/psr.nii.gz")
        prediction = turn(nib.Nifti1Image(np.asarray(noisy.dataobj), noisy.affine @ anisotropic))
        save_image(prediction, tmp_path / name / "pred/ms1/a/psr.nii.gz")
        rows[name] = {"subject": "ms1", "session": "a", "group": "MS", **write_session(tmp_path / name, images)}
        manifest = write_manifest(tmp_path / name / "manifest.csv", [rows[name]])
        results[name] = evaluate_predictions(manifest, {"noisy": tmp_path / name / "pred"}, tmp_path / name / "out",
                                             bootstrap=0, progress=False)
    ras, turned = results["ras"], results["turned"]
    assert turned["metrics"]["noisy"]["mse"]["mean"] == pytest.approx(ras["metrics"]["noisy"]["mse"]["mean"])
    auc = [r["lesion_contrast"]["auc"]["noisy"]["combined"]["auc"] for r in (ras, turned)]
    assert auc[0] == auc[1] and ras["lesion_contrast"]["n_lesions"] == turned["lesion_contrast"]["n_lesions"] > 0
    assert turned["figures"]["qualitative.png"] == ras["figures"]["qualitative.png"]
