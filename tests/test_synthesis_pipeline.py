"""The synthesis pipeline shared by every method: native grid, PSR units, bad input, batches that resume.

A stand-in synthesizer (PSR = a fixed linear function of T1w, optional noise per sample) isolates the pipeline from
any trained network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import ellipsoid_session
from demist.config import Config, load_config
from demist.data.nifti import save_image
from demist.errors import DemistError
from demist.data.manifest import PREDICTION_NAME, prediction_path
from demist.inference.batch import synthesize_manifest
from demist.inference.pipeline import std_path_for, synthesize_files, synthesize_images
from helpers import AFFINES


@dataclass
class StandIn:
    method: str = "stand-in"
    config: Config = field(default_factory=lambda: load_config("tiny"))
    calls: list[str] = field(default_factory=list)
    fail_on: str | None = None

    def predict(self, session, samples=1, seed=0, progress=False):
        self.calls.append(session.key)
        if self.fail_on is not None and session.t1w.sum() > 0 and len(self.calls) == 2:
            raise DemistError("stand-in failure")
        rng = np.random.default_rng(seed)
        draws = np.stack([0.4 * session.t1w + rng.normal(0, 0.01, session.t1w.shape) * (samples > 1)
                          for _ in range(samples)]).astype(np.float32)
        return draws.mean(0), (draws.std(0) if samples > 1 else None)


@pytest.mark.parametrize("orientation", AFFINES)
def test_output_is_on_the_t1w_grid_in_psr_units(orientation):
    images = ellipsoid_session(affine=AFFINES[orientation])
    t1w = images["t1w"]
    t1w.set_qform(t1w.affine, 1)
    t1w.set_sform(t1w.affine, 4)
    result = synthesize_images(StandIn(), t1w, images["flair"], images["brain_mask"])
    assert result.psr.shape == t1w.shape and result.std is None
    np.testing.assert_allclose(result.psr.affine, t1w.affine, atol=1e-6)
    assert int(result.psr.header["qform_code"]) == 1 and int(result.psr.header["sform_code"]) == 4
    psr = result.psr.get_fdata()
    brain = np.asarray(images["brain_mask"].dataobj) > 0
    assert np.all(psr[~brain] == 0)
    # 0.4 × (T1w scaled so its 99.5th percentile is 1) × psr_range: WM (T1w ≈ 1) ≈ 0.1 PSR units
    wm = np.asarray(images["wm_mask"].dataobj) > 0
    assert 0.07 < np.median(psr[wm]) < 0.11


def test_without_a_mask_the_output_is_cut_to_the_skull_stripped_t1w():
    images = ellipsoid_session()
    brain = np.asarray(images["brain_mask"].dataobj) > 0
    stripped = nib.Nifti1Image(np.asarray(images["t1w"].dataobj) * brain, images["t1w"].affine)
    psr = synthesize_images(StandIn(), stripped, images["flair"]).psr.get_fdata()
    assert np.all(psr[~brain] == 0) and np.count_nonzero(psr[brain]) > 0.9 * brain.sum()


def test_several_samples_write_mean_and_sd(tmp_path):
    images = ellipsoid_session()
    paths = {k: save_image(v, tmp_path / f"{k}.nii.gz") for k, v in images.items()}
    out = tmp_path / "out" / "psr.nii.gz"
    written = synthesize_files(StandIn(), paths["t1w"], paths["flair"], out, mask=paths["brain_mask"], samples=3)
    assert written == [out, std_path_for(out)] and std_path_for(out).name == "psr_std.nii.gz"
    std = nib.load(std_path_for(out)).get_fdata()
    assert std.shape == images["t1w"].shape
    brain = np.asarray(images["brain_mask"].dataobj) > 0
    assert np.all(std[~brain] == 0)
    # the stand-in's draws have SD 0.01 of psr_range (0.0025 PSR); the SD of 3 draws (ddof 0) is about 0.8 of that
    assert 0.4 * 0.0025 < np.median(std[brain]) < 1.2 * 0.0025
    # rerun over it with one sample: the earlier SD map described another output and goes with it
    assert synthesize_files(StandIn(), paths["t1w"], paths["flair"], out, samples=1, overwrite=True) == [out]
    assert out.exists() and not std_path_for(out).exists()


def _inputs(tmp_path: Path) -> dict[str, Path]:
    return {k: save_image(v, tmp_path / f"{k}.nii.gz") for k, v in ellipsoid_session().items()}


def _bad_cases(tmp_path: Path, paths: dict[str, Path]) -> dict[str, tuple[dict, str]]:
    t1w = nib.load(paths["t1w"])
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(paths["t1w"].read_bytes()[:-64])
    text = tmp_path / "text.nii.gz"
    text.write_text("hello")
    four_d = save_image(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), tmp_path / "4d.nii.gz")
    two_d = save_image(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), tmp_path / "2d.nii.gz")
    nan = np.asarray(t1w.dataobj).copy()
    nan[3, 3, 3] = np.nan
    nan_path = save_image(nib.Nifti1Image(nan, t1w.affine), tmp_path / "nan.nii.gz")
    far = t1w.affine.copy()
    far[:3, 3] += 1000
    far_path = save_image(nib.Nifti1Image(np.asarray(nib.load(paths["flair"]).dataobj), far), tmp_path / "far.nii.gz")
    empty = save_image(nib.Nifti1Image(np.zeros(t1w.shape, np.uint8), t1w.affine), tmp_path / "empty.nii.gz")
    far_mask = save_image(nib.Nifti1Image(np.ones(t1w.shape, np.uint8), far), tmp_path / "farmask.nii.gz")
    complex_path = save_image(nib.Nifti1Image(np.asarray(t1w.dataobj).astype(np.complex64), t1w.affine),
                              tmp_path / "complex.nii.gz")
    slab_affine = t1w.affine.copy()
    slab_affine[:3, 3] += t1w.affine[:3, 2] * 16  # slices 16-19 of the FLAIR only
    slab = save_image(nib.Nifti1Image(np.asarray(nib.load(paths["flair"]).dataobj)[:, :, 16:20], slab_affine),
                      tmp_path / "slab.nii.gz")
    return {
        "missing": ({"t1w": tmp_path / "none.nii.gz"}, "file not found"),
        "not nifti": ({"flair": text}, "FLAIR image"),
        "truncated": ({"t1w": cut}, "cut.nii.gz"),
        "4D": ({"t1w": four_d}, "4 dimensions"),
        "2D": ({"flair": two_d}, "2 dimensions"),
        "NaN": ({"t1w": nan_path}, "NaN or infinite"),
        "no overlap": ({"flair": far_path}, "physical space"),
        "empty mask": ({"mask": empty}, "mask is empty"),
        "mask elsewhere": ({"mask": far_mask}, "physical space"),
        "complex": ({"t1w": complex_path}, "voxels of type complex64"),
        "FLAIR slab": ({"flair": slab}, "of the brain; expected the whole brain"),
    }


@pytest.mark.parametrize("case", ["missing", "not nifti", "truncated", "4D", "2D", "NaN", "no overlap",
                                  "empty mask", "mask elsewhere", "complex", "FLAIR slab"])
def test_bad_input_gives_one_line_and_leaves_nothing(tmp_path, case):
    paths = _inputs(tmp_path)
    change, fragment = _bad_cases(tmp_path, paths)[case]
    args = {"t1w": paths["t1w"], "flair": paths["flair"], "mask": paths["brain_mask"], **change}
    out_dir = tmp_path / "out"
    with pytest.raises(DemistError) as info:
        synthesize_files(StandIn(), args["t1w"], args["flair"], out_dir / "psr.nii.gz", mask=args["mask"])
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_existing_output_needs_overwrite(tmp_path):
    paths = _inputs(tmp_path)
    out = tmp_path / "psr.nii.gz"
    out.write_bytes(b"keep me")
    with pytest.raises(DemistError, match="already exists"):
        synthesize_files(StandIn(), paths["t1w"], paths["flair"], out)
    assert out.read_bytes() == b"keep me"
    synthesize_files(StandIn(), paths["t1w"], paths["flair"], out, overwrite=True)
    assert nib.load(out).shape == nib.load(paths["t1w"]).shape


def test_an_output_that_is_a_directory_or_in_a_read_only_folder_is_refused_before_any_work(tmp_path):
    paths = _inputs(tmp_path)
    folder_named_like_a_map = tmp_path / "map.nii.gz"
    folder_named_like_a_map.mkdir()
    stand_in = StandIn()
    with pytest.raises(DemistError, match="is a directory; expected a file name"):
        synthesize_files(stand_in, paths["t1w"], paths["flair"], folder_named_like_a_map, overwrite=True)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # root writes anywhere: nothing to check then
        with pytest.raises(DemistError, match="is not writable"):
            synthesize_files(stand_in, paths["t1w"], paths["flair"], locked / "psr.nii.gz")
    assert stand_in.calls == []


def test_a_map_with_non_finite_voxels_is_never_written(tmp_path):
    paths = _inputs(tmp_path)

    class Overflowing(StandIn):
        def predict(self, session, samples=1, seed=0, progress=False):
            mean, std = super().predict(session, samples, seed, progress)
            mean[tuple(s // 2 for s in mean.shape)] = np.inf
            return mean, std

    out = tmp_path / "out" / "map.nii.gz"
    with pytest.raises(DemistError, match="stand-in: produced 1 NaN or infinite voxels"):
        synthesize_files(Overflowing(), paths["t1w"], paths["flair"], out)
    assert not out.exists()


def test_a_batch_redoes_a_session_whose_run_stopped_after_the_std_map(small_manifest, tmp_path):
    from demist.data.manifest import load_manifest

    out_dir = tmp_path / "pred"
    record = load_manifest(small_manifest)[0]
    leftover = std_path_for(prediction_path(out_dir, record))
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"from an interrupted run")
    summary = synthesize_manifest(StandIn(), small_manifest, out_dir, samples=2, progress=False)
    assert not summary.failed and record.key in summary.written
    assert nib.load(leftover).shape == nib.load(record.t1w).shape


def test_batch_goes_on_after_a_failure_and_resumes_without_redoing(small_manifest, tmp_path):
    out_dir = tmp_path / "pred"
    first = StandIn(fail_on="second session")
    summary = synthesize_manifest(first, small_manifest, out_dir, progress=False)
    assert len(summary.written) == 2 and len(summary.failed) == 1 and not summary.skipped
    failed = next(iter(summary.failed))
    subject, session = failed.split("/")
    assert not (out_dir / subject / session / PREDICTION_NAME).exists()
    again = StandIn()
    summary = synthesize_manifest(again, small_manifest, out_dir, progress=False)
    assert again.calls == ["input"] and summary.written == [failed] and len(summary.skipped) == 2


def test_a_batch_row_naming_a_missing_file_fails_that_session_only(small_manifest, tmp_path):
    from demist.data.manifest import load_manifest

    records = load_manifest(small_manifest)
    records[1].flair.unlink()  # the second session's FLAIR is gone
    summary = synthesize_manifest(StandIn(), small_manifest, tmp_path / "pred", progress=False)
    assert len(summary.written) == 2 and list(summary.failed) == [records[1].key]
    assert "flair file" in summary.failed[records[1].key] and "not found" in summary.failed[records[1].key]


def test_an_output_that_would_replace_an_input_is_refused(tmp_path):
    paths = _inputs(tmp_path)
    stand_in = StandIn()
    with pytest.raises(DemistError, match="is one of the inputs"):
        synthesize_files(stand_in, paths["t1w"], paths["flair"], paths["t1w"], overwrite=True)
    assert stand_in.calls == [] and nib.load(paths["t1w"]).get_data_dtype() == np.float32
