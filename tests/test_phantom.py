"""The synthetic cohort: files, tissue values, geometry, cohort structure, determinism and argument checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from demist.data.manifest import load_manifest
from demist.data.nifti import load_image
from demist.data.phantom import generate_cohort
from demist.data.phantom.signal import flair_signal, mprage_signal
from demist.errors import DemistError

SEED = 7  # sub-001: MS with two sessions, sub-002: MS with one, sub-003: HC with one
LABEL_CSF, LABEL_CORTEX, LABEL_WM = 1, 2, 4
VOLUMES = ("t1w", "flair", "psr", "brain_mask", "lesion_mask", "wm_mask")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("phantom") / "cohort", 3, spacing=2.0, seed=SEED, progress=False)


@pytest.fixture(scope="module")
def sessions(cohort: Path) -> list[dict]:
    """Every session's arrays, affine and metadata."""
    loaded = []
    for record in load_manifest(cohort, require=VOLUMES + ("meta",)):
        images = {name: load_image(getattr(record, name), name) for name in VOLUMES}
        item = {name: np.asarray(img.dataobj) for name, img in images.items()}
        item["labels"] = np.asarray(load_image(record.t1w.parent / "tissue_labels.nii.gz").dataobj)
        item.update(affine=images["t1w"].affine, meta=json.loads(record.meta.read_text()), record=record)
        loaded.append(item)
    return loaded


def _mirror(mask: np.ndarray, affine: np.ndarray, plane: dict) -> np.ndarray:
    """`mask` reflected across a plane given in world mm, on the same grid."""
    world = affine[:3, :3] @ np.argwhere(mask).T + affine[:3, 3:4]
    point, normal = np.array(plane["point"])[:, None], np.array(plane["normal"])[:, None]
    world -= 2 * normal * (normal * (world - point)).sum(axis=0)
    index = np.rint(np.linalg.solve(affine[:3, :3], world - affine[:3, 3:4])).astype(int)
    keep = np.all((index >= 0) & (index < np.array(mask.shape)[:, None]), axis=0)
    out = np.zeros_like(mask, dtype=bool)
    out[tuple(index[:, keep])] = True
    return out


def test_manifest_files_load_on_one_ras_grid(cohort: Path, sessions: list[dict]) -> None:
    assert len(sessions) == 4
    for s in sessions:
        shape = s["t1w"].shape
        assert all(s[name].shape == shape for name in VOLUMES)
        assert all(s[name].dtype == np.float32 for name in ("t1w", "flair", "psr"))
        assert all(s[name].dtype == np.uint8 for name in ("brain_mask", "lesion_mask", "wm_mask"))
        np.testing.assert_allclose(s["affine"][:3, :3], np.diag([2.0, 2.0, 2.0]))
        assert all(n % 16 == 0 for n in shape)
        centre = s["affine"] @ np.array([*(np.array(shape) - 1) / 2, 1.0])
        assert np.all(np.abs(centre[:3]) < 30)  # world origin near the middle of the head
        brain = s["brain_mask"] > 0
        assert 150_000 < brain.sum() < 350_000  # 1.2-2.8 L of brain at 8 mm³ per voxel
        outside = ndi.distance_transform_edt(~brain) > 2.5  # skull-stripped: nothing beyond the brain's edge
        assert all(np.all(s[name][outside] == 0) for name in ("t1w", "flair", "psr"))
        assert s["t1w"][brain].min() >= 0 and s["flair"][brain].mean() > 0


def test_tissue_psr_matches_3t_literature(sessions: list[dict]) -> None:
    for s in sessions:
        psr, labels, lesion = s["psr"], s["labels"], s["lesion_mask"] > 0
        nawm = psr[(labels == LABEL_WM) & ~lesion].mean()
        assert 0.10 <= nawm <= 0.16
        assert 0.06 <= psr[labels == LABEL_CORTEX].mean() <= 0.095
        assert abs(psr[ndi.binary_erosion(labels == LABEL_CSF)].mean()) < 0.02
        if lesion.any():
            assert psr[lesion].mean() < 0.8 * nawm
            assert s["flair"][lesion].mean() > 1.3 * s["flair"][(labels == LABEL_WM) & ~lesion].mean()


def test_proximal_nawm_is_below_its_contralateral_mirror(sessions: list[dict]) -> None:
    proximal, distal = [], []
    for s in sessions:
        lesion = s["lesion_mask"] > 0
        if not lesion.any():
            continue
        nawm = (s["labels"] == LABEL_WM) & ~lesion
        distance = ndi.distance_transform_edt(~lesion, sampling=2.0)
        near = nawm & (distance <= 5.0)
        far = _mirror(near, s["affine"], s["meta"]["midsagittal_plane"]) & nawm & (distance > 10.0)
        proximal.append(s["psr"][near].mean())
        distal.append(s["psr"][far].mean())
    assert len(proximal) >= 2
    assert np.mean(proximal) < 0.99 * np.mean(distal)


def test_brain_stays_away_from_the_field_of_view_edge(sessions: list[dict]) -> None:
    for s in sessions:
        support = (s["brain_mask"] > 0) | (s["psr"] != 0) | (s["t1w"] != 0)
        idx = np.argwhere(support)
        assert idx.min() >= 2 and np.all(idx.max(axis=0) <= np.array(support.shape) - 3)


def test_lesions_sit_in_white_matter(sessions: list[dict]) -> None:
    for s in sessions:
        lesion, wm, brain = (s[k] > 0 for k in ("lesion_mask", "wm_mask", "brain_mask"))
        assert not np.any(lesion & ~wm) and not np.any(wm & ~brain)
        for entry in s["meta"]["lesions"]:
            index = np.rint(np.linalg.solve(s["affine"][:3, :3], np.array(entry["centre_mm"]) - s["affine"][:3, 3]))
            assert brain[tuple(index.astype(int))], entry["id"]
            if entry["mask_voxels"] >= 5:  # a visible lesion's mask lies within its radius of its centre
                reach = (max(entry["radii_mm"]) + 2.0) / 2.0
                assert np.min(np.linalg.norm(np.argwhere(lesion) - index, axis=1)) <= reach, entry["id"]


def test_cohort_structure_and_metadata(sessions: list[dict]) -> None:
    by_subject: dict[str, list[dict]] = {}
    for s in sessions:
        by_subject.setdefault(s["record"].subject, []).append(s)
    assert list(by_subject) == ["sub-001", "sub-002", "sub-003"]
    assert [v[0]["record"].group for v in by_subject.values()] == ["MS", "MS", "HC"]
    for subject, items in by_subject.items():
        assert [s["record"].session for s in items] == [f"ses-{i:02d}" for i in range(1, len(items) + 1)]
        for i, s in enumerate(items, start=1):
            meta = s["meta"]
            assert (meta["subject"], meta["session_index"], meta["n_sessions"]) == (subject, i, len(items))
            assert meta["seed"] == SEED and meta["spacing"] == 2.0 and 18 <= meta["age"] <= 70
    assert all(not s["meta"]["lesions"] and not s["lesion_mask"].any() for s in by_subject["sub-003"])
    first, second = (s["meta"] for s in by_subject["sub-001"])
    assert second["age"] > first["age"] and second["atrophy"] >= first["atrophy"]
    assert {les["id"] for les in first["lesions"]} <= {les["id"] for les in second["lesions"]}
    for les in first["lesions"] + second["lesions"]:
        assert les["type"] in {"periventricular", "deep", "juxtacortical"}
        assert 1.2 <= min(les["radii_mm"]) and max(les["radii_mm"]) <= 7.0 * 1.1
        assert all(0.0 <= les[k] <= 1.0 for k in ("demyelination", "edema", "destruction"))
        assert isinstance(les["black_hole"], bool) and isinstance(les["shadow_plaque"], bool)
        np.testing.assert_allclose(np.linalg.norm(les["axes"], axis=1), 1.0, atol=1e-4)
    kinds = [les["type"] for s in sessions for les in s["meta"]["lesions"]]
    assert kinds.count("periventricular") >= kinds.count("juxtacortical")


def test_midsagittal_plane_splits_the_brain_in_mirror_halves(sessions: list[dict]) -> None:
    for s in sessions:
        plane = s["meta"]["midsagittal_plane"]
        normal = np.array(plane["normal"])
        assert np.isclose(np.linalg.norm(normal), 1.0, atol=1e-5) and normal[0] > 0.95  # points right (+x)
        brain = s["brain_mask"] > 0
        centroid = s["affine"][:3, :3] @ np.argwhere(brain).mean(axis=0) + s["affine"][:3, 3]
        assert abs(normal @ (centroid - np.array(plane["point"]))) < 4.0
        mirrored = _mirror(brain, s["affine"], plane)
        assert 2 * (mirrored & brain).sum() / (mirrored.sum() + brain.sum()) > 0.93


def test_same_seed_same_bytes_whatever_the_cohort_size(cohort: Path, tmp_path: Path) -> None:
    manifest = generate_cohort(tmp_path / "one", 1, spacing=2.0, seed=SEED, progress=False)
    assert sorted(p.name for p in (tmp_path / "one").iterdir() if p.is_dir()) == ["sub-001"]
    assert [r.subject for r in load_manifest(manifest)] == ["sub-001", "sub-001"]
    for path in sorted((tmp_path / "one" / "sub-001").rglob("*.*")):
        assert path.read_bytes() == (cohort.parent / path.relative_to(tmp_path / "one")).read_bytes(), path.name


def test_a_cohort_folder_is_regenerated_only_with_its_own_settings(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    generate_cohort(folder, 1, spacing=2.0, seed=SEED, progress=False)
    first = (folder / "sub-001/ses-01/t1w.nii.gz").read_bytes()
    (folder / "sub-001/ses-01/t1w.nii.gz").write_bytes(b"damaged")
    generate_cohort(folder, 1, spacing=2.0, seed=SEED, progress=False)  # the same cohort: rewritten
    assert (folder / "sub-001/ses-01/t1w.nii.gz").read_bytes() == first
    for other in ({"n_subjects": 2}, {"seed": SEED + 1}, {"spacing": 1.0}):
        args = {"n_subjects": 1, "spacing": 2.0, "seed": SEED, **other}
        with pytest.raises(DemistError, match="holds another synthetic cohort"):
            generate_cohort(folder, progress=False, **args)
    assert (folder / "sub-001/ses-01/t1w.nii.gz").read_bytes() == first


def test_another_seed_gives_another_subject(cohort: Path, tmp_path: Path) -> None:
    other = generate_cohort(tmp_path / "other", 1, spacing=2.0, seed=SEED + 1, progress=False)
    a = load_image(cohort.parent / "sub-001/ses-01/t1w.nii.gz").get_fdata()
    b = load_image(other.parent / "sub-001/ses-01/t1w.nii.gz").get_fdata()
    assert a.shape == b.shape and not np.allclose(a, b)


@pytest.mark.parametrize("kwargs", [
    {"n_subjects": 0}, {"n_subjects": 2.5}, {"n_subjects": True}, {"spacing": 0.0}, {"spacing": -2.0},
    {"spacing": float("nan")}, {"spacing": 9.0}, {"spacing": "2"}, {"seed": -1}, {"seed": 1.5},
])
def test_invalid_arguments_are_refused(tmp_path: Path, kwargs: dict) -> None:
    args = {"out_dir": tmp_path / "c", "n_subjects": 1, "spacing": 2.0, "seed": 0, "progress": False, **kwargs}
    with pytest.raises(DemistError):
        generate_cohort(**args)
    assert not (tmp_path / "c").exists()


def test_foreign_output_folders_are_refused(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "busy", tmp_path / "file"):
        with pytest.raises(DemistError, match="expected a new or empty folder"):
            generate_cohort(out, 1, progress=False)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_signal_equations_reproduce_3t_contrasts() -> None:
    pd = np.array([0.70, 0.82, 1.0, 0.80])  # WM, GM, CSF, T2 lesion
    t1 = np.array([850.0, 1400.0, 4300.0, 1300.0])
    t2 = np.array([75.0, 100.0, 1800.0, 150.0])
    mprage, flair = mprage_signal(pd, t1), flair_signal(pd, t1, t2)
    mprage, flair = mprage / mprage[0], flair / flair[0]
    assert 0.60 <= mprage[1] <= 0.70 and 0.15 <= mprage[2] <= 0.25 and 0.65 <= mprage[3] <= 0.85
    assert 1.15 <= flair[1] <= 1.30 and flair[2] <= 0.3 and 1.5 <= flair[3] <= 2.2
