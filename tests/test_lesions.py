"""Lesion ROIs (lesion, proximal and distal NAWM), the mid-sagittal plane, lesion-contrast AUC and its ROC figure."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
from nibabel.affines import apply_affine
from scipy import ndimage
from scipy.spatial.transform import Rotation

from demist.errors import DemistError
from demist.evaluation.figures import plot_roc
from demist.evaluation.lesions import (
    auc_text,
    contrast_auc,
    estimate_midsagittal_plane,
    lesion_bias,
    lesion_rois,
    mirror_matrix,
    roi_means,
)

SHAPE = (40, 40, 40)
CENTRE = np.array([3.0, -2.0, 5.0])  # world position of the head's centre, mm
LESIONS = [((9.0, 6.0, 0.0), 3.5), ((-11.0, -6.0, 4.0), 2.6), ((7.0, -12.0, -5.0), 3.0), ((-8.0, 12.0, -3.0), 3.2)]


def make_head(rotation_deg=(0.0, 0.0, 0.0), grid_rotation_deg=None, voxel_mm=(1.5, 1.5, 1.5)):
    """A head on a 40³ grid; shapes are defined in a body frame symmetric in x, turned by `rotation_deg` in world
    space, while the grid (the affine) is turned by `grid_rotation_deg` (default: the same as the head).

    Returns (affine, brain, wm, lesions, plane, body) where body holds each voxel's body-frame coordinates.
    """
    rotation = Rotation.from_euler("zyx", rotation_deg, degrees=True).as_matrix()
    grid = rotation
    if grid_rotation_deg is not None:
        grid = Rotation.from_euler("zyx", grid_rotation_deg, degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = grid @ np.diag(voxel_mm)
    affine[:3, 3] = CENTRE - affine[:3, :3] @ ((np.array(SHAPE) - 1) / 2)
    ijk = np.indices(SHAPE).reshape(3, -1).T
    body = (ijk @ affine[:3, :3].T + affine[:3, 3] - CENTRE) @ rotation  # rotation.T @ (world − centre)
    egg = 1 + 0.2 * body[:, 1] / 28  # asymmetric front-to-back and top-to-bottom, symmetric left-right
    brain = ((body[:, 0] / 25) ** 2 + (body[:, 1] / 28) ** 2 + (body[:, 2] / (22 * egg)) ** 2 <= 1).reshape(SHAPE)
    wm = ((body[:, 0] / 20) ** 2 + (body[:, 1] / 23) ** 2 + (body[:, 2] / (17 * egg)) ** 2 <= 1).reshape(SHAPE)
    lesions = np.zeros(SHAPE, bool)
    for centre, radius in LESIONS:
        lesions |= (np.linalg.norm(body - centre, axis=1) <= radius).reshape(SHAPE)
    plane = {"point": CENTRE.tolist(), "normal": rotation[:, 0].tolist()}
    return affine, brain, wm, lesions, plane, body.reshape(*SHAPE, 3)


def world_of(affine, flat_indices):
    return apply_affine(affine, np.stack(np.unravel_index(flat_indices, SHAPE), axis=1))


def side_of_plane(points, plane):
    return (points - np.asarray(plane["point"])) @ np.asarray(plane["normal"])


OBLIQUE = [((0.0, 0.0, 0.0), None), ((9.0, -6.0, 4.0), None), ((9.0, -6.0, 4.0), (-5.0, 3.0, 10.0))]
OBLIQUE_IDS = ["axis-aligned", "oblique-affine", "head-oblique-to-grid"]


@pytest.mark.parametrize("rotation,grid", OBLIQUE, ids=OBLIQUE_IDS)
def test_rois_respect_lesions_wm_and_hemispheres(rotation, grid):
    affine, _, wm, lesions, plane, _ = make_head(rotation, grid)
    ring_mm = 3.0
    rois = lesion_rois(lesions, wm, affine, plane=plane, ring_mm=ring_mm, min_voxels=5)
    assert len(rois) == len(LESIONS)
    all_lesion_world = world_of(affine, np.flatnonzero(lesions))
    for roi in rois:
        for region in (roi.pnawm, roi.dnawm):
            assert wm.flat[region].all()
            assert not lesions.flat[region].any()
        # pNAWM: a ring ring_mm wide beyond a 1-voxel safety margin around every lesion, never touching a lesion.
        ring = world_of(affine, roi.pnawm)
        own = world_of(affine, roi.lesion)
        to_own = np.linalg.norm(ring[:, None] - own[None], axis=2).min(axis=1)
        assert to_own.max() <= ring_mm + np.sqrt(3) * 1.5 + 1e-6  # the margin reaches a voxel diagonal (1.5 mm grid)
        assert to_own.min() > 1.5 * 1.0  # beyond the adjacent voxels
        # dNAWM: on the other side of the mid-sagittal plane, at the mirror image of the lesion, far from all lesions.
        distal = world_of(affine, roi.dnawm)
        lesion_side = np.sign(side_of_plane(np.asarray(roi.centroid_world), plane))
        assert np.all(np.sign(side_of_plane(distal, plane)) == -lesion_side)
        mirrored_centroid = apply_affine(mirror_matrix(plane), roi.centroid_world)
        assert np.linalg.norm(distal.mean(axis=0) - mirrored_centroid) < 2.5
        assert np.linalg.norm(distal[:, None] - all_lesion_world[None], axis=2).min() > ring_mm
        assert not np.intersect1d(roi.dnawm, roi.pnawm).size


@pytest.mark.parametrize("voxel_mm", [1.0, 2.0])
def test_the_proximal_ring_has_its_width_beyond_the_margin_at_any_voxel_size(voxel_mm):
    """A 3 mm ring measured from the lesion would lie inside the one-voxel margin at 2 mm (its diagonal: 3.5 mm)
    and leave no pNAWM; measured from the margin it is a shell of about the same width at 1 and 2 mm."""
    shape = (32, 32, 32)
    affine = np.diag([voxel_mm] * 3 + [1.0])
    affine[:3, 3] = -np.array(shape) / 2 * voxel_mm
    world = apply_affine(affine, np.indices(shape).reshape(3, -1).T).reshape(*shape, 3)
    lesion = np.linalg.norm(world - np.array([8.0, 0.0, 0.0]), axis=-1) <= 5.0
    (roi,) = lesion_rois(lesion, np.ones(shape, bool), affine, ring_mm=3.0, min_voxels=1,
                         plane={"point": [0.0, 0.0, 0.0], "normal": [1.0, 0.0, 0.0]})
    to_lesion = ndimage.distance_transform_edt(~lesion, sampling=voxel_mm).flat[roi.pnawm]
    assert to_lesion.min() > voxel_mm and to_lesion.max() <= 3.0 + np.sqrt(3) * voxel_mm + 1e-6
    assert roi.pnawm.size * voxel_mm ** 3 > 2 * roi.lesion.size * voxel_mm ** 3  # a shell, not a few voxels


def test_lesions_too_small_to_score_are_counted_by_the_region_that_was_too_small():
    shape = (24, 24, 24)
    lesion = np.zeros(shape, bool)
    lesion[4, 3, 3] = True  # one voxel
    lesion[16:19, 11:14, 11:14] = True  # 27 voxels
    drops = Counter()
    rois = lesion_rois(lesion, np.ones(shape, bool), np.eye(4), ring_mm=2.0, min_voxels=5, drops=drops,
                       plane={"point": [11.5, 0.0, 0.0], "normal": [1.0, 0.0, 0.0]})
    assert len(rois) == 1 and drops == Counter({"lesion": 1})


def test_mirror_region_has_no_holes_on_an_oblique_grid():
    affine, _, _, _, plane, body = make_head((9.0, -6.0, 4.0), (-5.0, 3.0, 10.0))
    (centre, radius), everywhere = LESIONS[0], np.ones(SHAPE, bool)
    lesion = np.linalg.norm(body - centre, axis=-1) <= radius  # one lesion: its mirror is far from any lesion
    (roi,) = lesion_rois(lesion, everywhere, affine, plane=plane, min_voxels=1)
    mirror = roi.mask("dnawm")
    assert abs(roi.dnawm.size - roi.lesion.size) <= max(3, 0.1 * roi.lesion.size)
    assert ndimage.label(mirror)[1] == 1  # one 6-connected piece...
    assert np.array_equal(ndimage.binary_fill_holes(mirror), mirror)  # ...without holes


@pytest.mark.parametrize("rotation,grid", OBLIQUE, ids=OBLIQUE_IDS)
def test_estimated_plane_matches_the_symmetry(rotation, grid):
    affine, brain, _, _, plane, _ = make_head(rotation, grid)
    estimate = estimate_midsagittal_plane(brain, affine)
    true_normal = np.asarray(plane["normal"])
    angle = np.degrees(np.arccos(min(1.0, abs(np.dot(estimate["normal"], true_normal)))))
    assert angle < 1.5
    assert abs(side_of_plane(np.asarray(estimate["point"]), plane)) < 0.75
    assert estimate["normal"][0] > 0


def test_without_plane_the_brain_mask_is_used():
    affine, brain, wm, lesions, plane, _ = make_head((6.0, 0.0, 0.0))
    given = lesion_rois(lesions, wm, affine, plane=plane)
    estimated = lesion_rois(lesions, wm, affine, brain_mask=brain)
    assert [r.label for r in given] == [r.label for r in estimated]
    for a, b in zip(given, estimated):
        overlap = np.intersect1d(a.dnawm, b.dnawm).size / max(a.dnawm.size, b.dnawm.size)
        assert overlap > 0.6


def test_small_lesions_are_dropped_with_a_reason(caplog):
    affine, _, wm, lesions, plane, _ = make_head()
    lesions = lesions.copy()
    lesions[20, 30, 20] = True  # an isolated single voxel
    with caplog.at_level(logging.DEBUG, logger="demist.evaluation.lesions"):
        rois = lesion_rois(lesions, wm, affine, plane=plane, min_voxels=5)
    assert len(rois) == len(LESIONS)
    assert any("dropped" in r.message and "lesion has 1 voxels" in r.message for r in caplog.records)


def test_diagonal_neighbours_form_one_lesion():
    affine, _, wm, _, plane, _ = make_head()
    lesions = np.zeros(SHAPE, bool)
    lesions[25, 22, 20] = lesions[26, 23, 21] = lesions[27, 24, 22] = True  # touching only at corners
    rois = lesion_rois(lesions, wm, affine, plane=plane, min_voxels=1)
    assert len(rois) == 1 and rois[0].lesion.size == 3


def test_roi_means_and_bias():
    affine, _, wm, lesions, plane, _ = make_head()
    rois = lesion_rois(lesions, wm, affine, plane=plane)
    psr = np.where(wm, 0.12, 0.07)
    psr[lesions] = 0.06
    means = roi_means(psr, rois)
    assert means.shape == (len(rois), 3)
    np.testing.assert_allclose(means, np.tile([0.06, 0.12, 0.12], (len(rois), 1)))
    bias = lesion_bias(means + 0.01, means)
    for region in ("lesion", "pnawm", "dnawm"):
        assert bias[region] == pytest.approx(0.01)
    flattened = means.copy()
    flattened[:, 0] = 0.09  # a method that loses half the lesion contrast
    assert lesion_bias(flattened, means)["contrast_pnawm"] == pytest.approx((1 - 0.09 / 0.12) - 0.5)
    with pytest.raises(DemistError):
        roi_means(psr[:-1], rois)


def test_auc_direction_and_known_value():
    perfect = contrast_auc([0.05, 0.06, 0.07], [0.11, 0.12, 0.13], [0.12, 0.12, 0.12], n_boot=50)
    assert perfect["n_lesions"] == 3
    for region in ("pnawm", "dnawm", "combined"):
        assert perfect[region]["auc"] == 1.0 and perfect[region]["ci95"] == pytest.approx((1.0, 1.0))
    reversed_ = contrast_auc([0.2, 0.3], [0.1, 0.1], [0.1, 0.1], n_boot=0)
    assert reversed_["combined"]["auc"] == 0.0 and np.isnan(reversed_["combined"]["ci95"][0])
    # Lesions {1, 3} vs pNAWM {2, 4}: lesion below reference in 3 of 4 pairs.
    assert contrast_auc([1, 3], [2, 4], [5, 5], n_boot=0)["pnawm"]["auc"] == pytest.approx(0.75)


def test_bootstrap_auc_form_agrees_with_sklearn():
    rng = np.random.default_rng(4)
    lesion = rng.integers(0, 6, 30).astype(float)  # coarse values: many ties
    pnawm, dnawm = rng.integers(2, 8, (2, 30)).astype(float)
    everyone = np.arange(30)[None]  # one "resample" that is the sample itself
    for references in (pnawm[:, None], np.stack([pnawm, dnawm], axis=1)):
        from demist.evaluation.lesions import _auc_with_ci

        result = _auc_with_ci(lesion, references, everyone)
        assert result["ci95"][0] == pytest.approx(result["auc"], abs=1e-12)


def test_auc_bootstrap_and_perfect_prediction_equals_oracle(tmp_path):
    affine, _, wm, lesions, plane, body = make_head((5.0, 3.0, 0.0))
    rois = lesion_rois(lesions, wm, affine, plane=plane)
    rng = np.random.default_rng(0)
    truth = np.where(wm, 0.115, 0.075) + rng.normal(0, 0.01, SHAPE)
    truth[lesions] -= 0.04
    truth -= 0.004 * (body[..., 0] > 0)  # a hemisphere difference, so pNAWM and dNAWM AUCs differ
    oracle = contrast_auc(*roi_means(truth, rois).T, n_boot=200, seed=3)
    same = contrast_auc(*roi_means(truth.copy(), rois).T, n_boot=200, seed=3)
    assert same == oracle
    blurred = 0.5 * truth + 0.5 * 0.1
    method = contrast_auc(*roi_means(blurred, rois).T, n_boot=200, seed=3)
    for region in ("pnawm", "dnawm", "combined"):
        low, high = oracle[region]["ci95"]
        assert 0.0 <= low <= oracle[region]["auc"] <= high <= 1.0
        assert len(oracle[region]["fpr"]) == len(oracle[region]["tpr"]) >= 2
        # AUC is rank-based: an affine rescaling of the map changes nothing.
        assert method[region]["auc"] == oracle[region]["auc"]
    path = plot_roc({"oracle": oracle, "shrunk": method}, tmp_path / "roc.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_patient_bootstrap_resamples_whole_patients():
    """Six patients whose lesions separate perfectly within each but not across (each patient has its own level):
    resampling whole patients gives a wider CI than resampling lesions as if independent; with fewer than
    MIN_BOOTSTRAP_PATIENTS patients there is no CI."""
    from demist.evaluation.lesions import MIN_BOOTSTRAP_PATIENTS

    levels = np.repeat(np.array([0.10, 0.20, 0.12, 0.18, 0.14, 0.16]), 8)
    lesion = levels + np.tile(np.linspace(0, 0.004, 8), 6)
    nawm = levels + 0.05
    patients = np.repeat([f"sub-{i}" for i in range(6)], 8)
    by_lesion = contrast_auc(lesion, nawm, nawm, n_boot=400, seed=1)["combined"]
    by_patient = contrast_auc(lesion, nawm, nawm, n_boot=400, seed=1, patients=patients)["combined"]
    assert by_patient["auc"] == by_lesion["auc"] < 1.0
    width = {name: r["ci95"][1] - r["ci95"][0] for name, r in (("lesion", by_lesion), ("patient", by_patient))}
    assert width["patient"] > width["lesion"] > 0
    few = MIN_BOOTSTRAP_PATIENTS - 1
    some = contrast_auc(lesion[: 8 * few], nawm[: 8 * few], nawm[: 8 * few], n_boot=400,
                        patients=patients[: 8 * few])["combined"]
    assert np.isnan(some["ci95"][0]) and auc_text(some) == f"{some['auc']:.3f} [—]"
    low, high = by_patient["ci95"]
    assert auc_text(by_patient) == f"{by_patient['auc']:.3f} [{low:.3f}, {high:.3f}]"
    with pytest.raises(DemistError, match="one per lesion"):
        contrast_auc(lesion, nawm, nawm, patients=patients[:5])


@pytest.mark.parametrize("bad", ["shape", "plane", "lengths", "nan"])
def test_bad_inputs_raise(bad):
    affine, _, wm, lesions, plane, _ = make_head()
    with pytest.raises(DemistError):
        if bad == "shape":
            lesion_rois(lesions, wm[:-1], affine, plane=plane)
        elif bad == "plane":
            lesion_rois(lesions, wm, affine, plane={"point": [0, 0, 0], "normal": [0, 0, 0]})
        elif bad == "lengths":
            contrast_auc([0.1, 0.2], [0.1], [0.1, 0.2])
        else:
            contrast_auc([0.1, np.nan], [0.1, 0.2], [0.1, 0.2])
