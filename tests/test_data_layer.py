"""Loader errors, manifest checks, and the geometry round trip back to the T1w's native grid."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from helpers import AFFINES, ellipsoid_session
from demist.config import load_config
from demist.data.manifest import load_manifest
from demist.data.nifti import load_image, load_mask, save_image
from demist.data.preprocess import prepare_images, prepare_session, psr_to_native, scaling_region
from demist.data.space import onto_model_grid
from demist.errors import DemistError

CFG = load_config("tiny").data


def _save(tmp_path: Path, name: str, data, affine=None) -> Path:
    return save_image(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), tmp_path / name)


# --- NIfTI loading ---------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DemistError, match="file not found"):
        load_image(tmp_path / "nope.nii.gz", "T1w")


def test_not_nifti(tmp_path):
    bad = tmp_path / "x.nii.gz"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(DemistError, match="not a readable NIfTI|truncated or corrupt"):
        load_image(bad)


def test_wrong_extension(tmp_path):
    f = tmp_path / "x.png"
    f.write_bytes(b"\x89PNG")
    with pytest.raises(DemistError, match="not a NIfTI file name"):
        load_image(f)


def test_truncated_gzip(tmp_path):
    good = _save(tmp_path, "good.nii.gz", np.ones((8, 8, 8), np.float32))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(DemistError, match="cut.nii.gz"):
        load_image(cut)


@pytest.mark.parametrize("shape, fragment", [((8, 8), "2 dimensions"), ((8, 8, 8, 3), "4 dimensions")])
def test_not_3d(tmp_path, shape, fragment):
    f = _save(tmp_path, "x.nii.gz", np.ones(shape, np.float32))
    with pytest.raises(DemistError, match=fragment):
        load_image(f)


def test_singleton_fourth_axis_is_squeezed(tmp_path):
    f = _save(tmp_path, "x.nii.gz", np.ones((8, 8, 8, 1), np.float32))
    assert load_image(f).shape == (8, 8, 8)


def test_non_finite(tmp_path):
    data = np.ones((8, 8, 8), np.float32)
    data[1, 2, 3] = np.nan
    data[2, 2, 2] = np.inf
    with pytest.raises(DemistError, match="2 voxels are NaN or infinite"):
        load_image(_save(tmp_path, "x.nii.gz", data))


def test_empty_mask(tmp_path):
    with pytest.raises(DemistError, match="mask is empty"):
        load_mask(_save(tmp_path, "m.nii.gz", np.zeros((8, 8, 8), np.uint8)))


def test_save_is_reproducible_and_keeps_codes(tmp_path):
    affine = np.diag([-1.0, 1.0, 1.5, 1.0])
    img = nib.Nifti1Image(np.arange(512, dtype=np.float32).reshape(8, 8, 8), affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 4)
    a = save_image(img, tmp_path / "a.nii.gz").read_bytes()
    b = save_image(img, tmp_path / "b.nii.gz").read_bytes()
    assert a == b and gzip.decompress(a)  # no timestamp in the gzip header
    back = load_image(tmp_path / "a.nii.gz")
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 4
    np.testing.assert_array_equal(back.get_fdata(), img.get_fdata())
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_save_refuses_existing_without_overwrite(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    save_image(img, tmp_path / "a.nii.gz")
    with pytest.raises(DemistError, match="already exists"):
        save_image(img, tmp_path / "a.nii.gz", overwrite=False)


# --- manifest --------------------------------------------------------------------------------------------------


def test_manifest_loads_relative_paths(small_manifest):
    records = load_manifest(small_manifest)
    assert [r.key for r in records] == ["s1/a", "s1/b", "s2/a"]
    assert all(r.t1w.is_absolute() and r.t1w.exists() for r in records)
    assert records[0].meta is None


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda t: t.replace("lesion_mask", "lesions"), "missing column(s) lesion_mask"),
        (lambda t: t.replace("subject,", "subject,extra,", 1), "unknown column(s) extra"),
        (lambda t: t.replace("s1/a/t1w.nii.gz", "s1/a/gone.nii.gz"), "t1w file"),
        (lambda t: t.replace("s1/b/flair.nii.gz", ""), "column flair is empty"),
        (lambda t: t.replace("s1,b,", "s1,a,"), "appears twice"),
        (lambda t: t.splitlines()[0] + "\n", "has no sessions"),
        (lambda t: t.replace("s1,b,", "s1,../b,"), "session '../b'; expected a name without '/'"),
        (lambda t: t.replace("s1,b,", "..,b,"), "subject '..'; expected a name"),
    ],
)
def test_manifest_errors(small_manifest, edit, fragment):
    text = small_manifest.read_text()
    if "extra" in fragment:
        lines = text.splitlines()
        rows = [",".join([row.split(",")[0], "x", *row.split(",")[1:]]) for row in lines[1:]]
        text = "\n".join([lines[0].replace("subject,", "subject,extra,", 1)] + rows)
    else:
        text = edit(text)
    small_manifest.write_text(text)
    with pytest.raises(DemistError) as info:
        load_manifest(small_manifest)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_manifest_not_found(tmp_path):
    with pytest.raises(DemistError, match="file not found"):
        load_manifest(tmp_path / "none.csv")
    with pytest.raises(DemistError, match="is a directory; expected a CSV"):
        load_manifest(tmp_path)


def test_healthy_controls_are_named_in_any_case_and_every_other_group_is_a_patient_group(small_manifest):
    """The demo's split and the lesion analysis both read `SessionRecord.is_patient`."""
    record = load_manifest(small_manifest)[0]
    for group, patient in (("HC", False), ("control", False), (" Healthy ", False), ("Controls", False),
                           ("MS", True), ("RRMS", True), ("unknown", True)):
        assert dataclasses.replace(record, group=group).is_patient is patient, group


# --- preprocessing and the way back ----------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", AFFINES)
def test_prepare_and_return_to_native_grid(orientation):
    images = ellipsoid_session(affine=AFFINES[orientation])
    session = prepare_images(images["t1w"], images["flair"], CFG, brain=images["brain_mask"], psr=images["psr"])
    assert all(s % CFG.divisor == 0 for s in session.grid.shape)
    assert np.allclose(np.abs(session.grid.affine[:3, :3]), np.eye(3) * CFG.spacing)  # RAS, isotropic
    region = scaling_region(session.brain, CFG.percentile_margin_mm / CFG.spacing)
    assert np.allclose(np.percentile(session.t1w[region], [CFG.percentile_low, CFG.percentile_high]), [0, 1], atol=1e-3)
    back = psr_to_native(session.psr, session.grid, CFG.psr_range)
    assert back.shape == images["t1w"].shape
    np.testing.assert_allclose(back.affine, images["t1w"].affine, atol=1e-6)
    brain = np.asarray(images["brain_mask"].dataobj) > 0
    interior = brain & (np.asarray(images["wm_mask"].dataobj) > 0)
    truth = images["psr"].get_fdata()
    error = np.abs(back.get_fdata() - truth)[interior]
    tolerance = 1e-5 if orientation != "oblique" else 0.02  # two trilinear moves blur edges of oblique grids
    assert np.median(error) <= tolerance


def test_ras_input_on_the_model_spacing_is_not_interpolated():
    images = ellipsoid_session()
    session = prepare_images(images["t1w"], images["flair"], CFG, brain=images["brain_mask"], psr=images["psr"])
    back = psr_to_native(session.psr, session.grid, CFG.psr_range)
    np.testing.assert_allclose(back.get_fdata(), images["psr"].get_fdata(), atol=1e-6)


def test_a_flair_on_another_grid_lands_on_the_t1w_anatomy():
    """The same anatomy on a grid cut 3 voxels later lands exactly where the FLAIR on the T1w's grid does; on a
    coarser grid it lands there up to the blur, far closer than the same data read 3 voxels off."""
    images = ellipsoid_session()
    flair, brain = images["flair"], images["brain_mask"]
    reference = prepare_images(images["t1w"], flair, CFG, brain=brain).flair
    start = np.eye(4)
    start[0, 3] = 3  # voxel 3 of the old grid is voxel 0 of the new one
    cut = nib.Nifti1Image(np.asarray(flair.dataobj)[3:], flair.affine @ start)
    coarse = nib.processing.resample_to_output(cut, voxel_sizes=(2.0, 2.0, 4.0))
    misplaced = nib.Nifti1Image(np.asarray(cut.dataobj), flair.affine)
    inside = prepare_images(images["t1w"], flair, CFG, brain=brain).brain > 0
    error = {name: np.abs(prepare_images(images["t1w"], img, CFG, brain=brain).flair - reference)[inside].mean()
             for name, img in (("cut", cut), ("coarse", coarse), ("misplaced", misplaced))}
    assert error["cut"] < 1e-5
    assert error["coarse"] < 0.25 * error["misplaced"]


def test_images_on_another_grid_are_interpolated_once():
    """A FLAIR, a PSR map and a lesion mask stored on the model grid itself, beside an oblique T1w, arrive unchanged:
    they go straight onto the model grid, not through the T1w's oblique grid first (a second blur)."""
    images = ellipsoid_session(affine=AFFINES["oblique"])
    brain = images["brain_mask"]
    grid = prepare_images(images["t1w"], images["flair"], CFG, brain=brain).grid
    rng = np.random.default_rng(1)
    noise = rng.uniform(0.5, 1.5, grid.shape).astype(np.float32)  # detail that a second interpolation would blur
    spots = (rng.uniform(size=grid.shape) < 0.1).astype(np.uint8)  # single voxels a second move would shift or lose
    on_grid = lambda data: nib.Nifti1Image(data, grid.affine)  # noqa: E731
    session = prepare_images(images["t1w"], on_grid(noise), CFG, brain=brain, psr=on_grid(noise * 0.1),
                             lesion=on_grid(spots))
    region = scaling_region(session.brain, CFG.percentile_margin_mm / CFG.spacing)
    lo, hi = np.percentile(noise[region], [CFG.percentile_low, CFG.percentile_high])
    np.testing.assert_allclose(session.flair[session.brain], ((noise - lo) / (hi - lo))[session.brain], atol=1e-5)
    np.testing.assert_allclose(session.psr, noise * np.float32(0.1 / CFG.psr_range), rtol=1e-5)
    np.testing.assert_array_equal(session.lesion, spots > 0)


def test_images_that_do_not_overlap_are_refused():
    images = ellipsoid_session()
    far = images["flair"].affine.copy()
    far[:3, 3] += 500.0
    with pytest.raises(DemistError, match="covers 0% of the reference"):
        prepare_images(images["t1w"], nib.Nifti1Image(np.asarray(images["flair"].dataobj), far), CFG,
                       brain=images["brain_mask"])


def test_unstripped_input_without_mask_is_refused():
    images = ellipsoid_session()
    noisy = np.asarray(images["t1w"].dataobj) + np.random.default_rng(0).normal(0.05, 0.01, images["t1w"].shape)
    with pytest.raises(DemistError, match="skull-stripped"):
        prepare_images(nib.Nifti1Image(noisy, images["t1w"].affine), images["flair"], CFG)


def test_a_stripped_t1w_stored_with_an_intercept_is_still_stripped(tmp_path):
    """scl_inter ≠ 0: the stored zero background reads as the intercept once loaded; it is still the background."""
    from demist.data.nifti import load_image
    from demist.data.preprocess import brain_from_background

    images = ellipsoid_session()
    data = np.round(np.asarray(images["t1w"].dataobj) * 1000).astype(np.int16)
    image = nib.Nifti1Image(data, images["t1w"].affine)
    image.header.set_slope_inter(0.001, 5.0)
    nib.save(image, tmp_path / "t1w.nii.gz")
    loaded = load_image(tmp_path / "t1w.nii.gz", "T1w")
    assert np.asarray(loaded.dataobj).min() == 5.0  # the background, scaled
    expected = brain_from_background(images["t1w"], "T1w")
    np.testing.assert_array_equal(brain_from_background(loaded, "T1w"), expected)
    session = prepare_images(loaded, images["flair"], CFG)
    assert session.brain.sum() == prepare_images(images["t1w"], images["flair"], CFG).brain.sum()


def test_prepare_session_from_manifest(small_manifest):
    record = load_manifest(small_manifest)[0]
    session = prepare_session(record, CFG)
    assert session.psr is not None and session.lesion.any() and session.wm.any()
    assert session.condition.shape == (2, *session.grid.shape)
    wm_psr = session.psr[session.wm & ~session.lesion].mean() * CFG.psr_range
    assert abs(wm_psr - 0.11) < 0.005


def test_scaling_ignores_where_the_mask_edge_falls_with_a_margin_and_not_without():
    """A skull-stripping tool that adds one shell of zero-valued voxels around the brain moves the paper's 0th
    percentile (one voxel) to zero; the 1st percentile 4 mm inside the edge does not move."""
    images = ellipsoid_session()
    brain = np.asarray(images["brain_mask"].dataobj) > 0
    wider = nib.Nifti1Image(ndimage.binary_dilation(brain).astype(np.uint8), images["brain_mask"].affine)
    paper_like = dataclasses.replace(CFG, percentile_low=0.0, percentile_margin_mm=0.0)
    for cfg, moves in ((paper_like, True), (CFG, False)):
        tight, loose = (prepare_images(images["t1w"], images["flair"], cfg, brain=mask, wm=images["wm_mask"])
                        for mask in (images["brain_mask"], wider))
        # the grids differ (each is cut around its mask), so compare a tissue's scaled level: the WM's median FLAIR
        shift = abs(float(np.median(tight.flair[tight.wm])) - float(np.median(loose.flair[loose.wm])))
        assert (shift > 0.05) == moves, (cfg.percentile_low, cfg.percentile_margin_mm, shift)


def test_scaling_region_is_the_interior_unless_that_leaves_under_half_the_brain():
    brain = np.zeros((34, 34, 34), bool)
    brain[2:32, 2:32, 2:32] = True
    assert scaling_region(brain, 0).sum() == brain.sum()
    assert scaling_region(brain, 2).sum() == 26 ** 3  # two voxels off every face
    thin = np.zeros_like(brain)
    thin[2:32, 2:32, 16:18] = True  # a slab two voxels thick erodes to nothing: the whole mask is kept
    assert scaling_region(thin, 2).sum() == thin.sum()


def test_a_constant_map_returns_constant_up_to_the_brains_edge_on_a_finer_native_grid():
    """On a 1 mm T1w the 2 mm model grid's brain edge falls between native voxels: a map that is 0.1 PSR inside the
    brain (and anything outside it) comes back 0.1 on every native brain voxel, not pulled toward the outside."""
    images = ellipsoid_session(shape=(60, 64, 56), affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    session = prepare_images(images["t1w"], images["flair"], CFG, brain=images["brain_mask"])
    inside_brain = np.where(session.brain, 0.1 / CFG.psr_range, 3.0).astype(np.float32)
    brain = np.asarray(images["brain_mask"].dataobj) > 0
    back = psr_to_native(inside_brain, session.grid, CFG.psr_range, session.brain).get_fdata()[brain]
    np.testing.assert_allclose(back, 0.1, atol=1e-5)
    masked_first = psr_to_native(inside_brain * session.brain, session.grid, CFG.psr_range).get_fdata()[brain]
    assert masked_first.min() < 0.08  # what the edge looked like when the masked map was resampled
    # native brain voxels beyond the mask's reach (here: half of it cut away) take the nearest value inside it
    half = session.brain.copy()
    half[: half.shape[0] // 2] = False
    inside_half = np.where(half, 0.1 / CFG.psr_range, 3.0).astype(np.float32)
    back = psr_to_native(inside_half, session.grid, CFG.psr_range, half).get_fdata()[brain]
    np.testing.assert_allclose(back, 0.1, atol=1e-5)


def test_outputs_take_the_t1ws_geometry_but_not_its_display_window():
    images = ellipsoid_session()
    t1w = images["t1w"]
    t1w.header["cal_min"], t1w.header["cal_max"], t1w.header["descrip"] = 0, 1000, b"MPRAGE"
    session = prepare_images(t1w, images["flair"], CFG, brain=images["brain_mask"], psr=images["psr"])
    back = psr_to_native(session.psr, session.grid, CFG.psr_range, session.brain)
    assert (back.header["cal_min"], back.header["cal_max"], back.header["descrip"]) == (0, 0, b"")
    np.testing.assert_array_equal(back.affine, t1w.affine)


def test_an_integer_flair_on_another_grid_is_interpolated_in_floating_point():
    images = ellipsoid_session()
    coarse = nib.processing.resample_to_output(images["flair"], voxel_sizes=(2.0, 2.0, 4.0))
    as_int = nib.Nifti1Image(np.round(np.asarray(coarse.dataobj) * 100).astype(np.int16), coarse.affine)
    grid = prepare_images(images["t1w"], images["flair"], CFG).grid
    moved = onto_model_grid(as_int, grid)
    assert moved.dtype == np.float32
    assert np.any(np.abs(moved - np.round(moved)) > 0.25)  # halfway between two slices, not rounded to an integer


def test_a_flair_slab_that_leaves_out_most_of_the_brain_is_refused():
    images = ellipsoid_session()
    flair = images["flair"]
    shift = np.eye(4)
    shift[2, 3] = 16  # slices 16-19 only
    slab = nib.Nifti1Image(np.asarray(flair.dataobj)[:, :, 16:20], flair.affine @ shift)
    with pytest.raises(DemistError, match=r"flair of session: its field of view covers [\d.]+% of the brain"):
        prepare_images(images["t1w"], slab, CFG, brain=images["brain_mask"])


def test_ras_view_shows_one_anatomy_whatever_the_storage_order():
    """The same volume stored as RAS and as a flipped, axis-swapped copy (its affine to match) looks the same in
    RAS view, and a voxel index follows it there."""
    from demist.data.space import ras_view, ras_voxel, ras_voxel_size

    volume = np.random.default_rng(0).random((5, 6, 7))
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    stored = np.flip(volume, axis=0).transpose(2, 0, 1)  # stored axes: S, L (R flipped), A
    swap = np.array([[0, -2.0, 0, 8.0], [0, 0, 2.0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    ijk = np.array([[1, 2, 3], [4, 0, 6]])
    stored_ijk = np.stack([ijk[:, 2], 4 - ijk[:, 0], ijk[:, 1]], axis=1)
    np.testing.assert_allclose(nib.affines.apply_affine(swap, stored_ijk), nib.affines.apply_affine(ras, ijk))
    np.testing.assert_array_equal(ras_view(stored, swap), volume)
    np.testing.assert_array_equal(ras_view(volume, ras), volume)
    np.testing.assert_array_equal(ras_voxel(stored_ijk, stored.shape, swap), ijk)
    stored_spacing = np.array([[0, -1.0, 0, 0], [0, 0, 2.0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])  # stored axes S, L, A
    np.testing.assert_array_equal(ras_voxel_size(stored_spacing), [1.0, 2.0, 3.0])


def test_cohort_summary_reads_masks_stored_on_another_grid(tmp_path):
    """A lesion mask stored on a larger grid (the same anatomy, 3 more voxels on every side) gives the same lesion
    volume and PSR means as the one on the PSR map's grid."""
    from helpers import two_subject_manifest
    from demist.data.summary import cohort_summary

    manifest = two_subject_manifest(tmp_path)
    before = cohort_summary(manifest)
    path = tmp_path / "s1" / "a" / "lesion_mask.nii.gz"
    mask = load_image(path)
    shift = np.eye(4)
    shift[:3, 3] = -3  # voxel 0 of the padded grid is voxel -3 of the old one
    save_image(nib.Nifti1Image(np.pad(np.asarray(mask.dataobj), 3), mask.affine @ shift), path)
    assert cohort_summary(manifest) == before
