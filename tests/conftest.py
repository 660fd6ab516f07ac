"""Shared fixtures: small synthetic NIfTI sessions built in memory (no network, no downloads)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from demist.data.manifest import write_manifest
from demist.data.nifti import save_image


def ellipsoid_session(shape=(40, 44, 36), affine=None, seed: int = 0) -> dict[str, nib.Nifti1Image]:
    """A skull-stripped 'head': an ellipsoid brain with a WM core, one lesion, and PSR that follows tissue."""
    rng = np.random.default_rng(seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(axis=0))
    brain = r < 0.7
    wm = r < 0.45
    lesion = np.sqrt(((grid - np.array([0.2, 0.1, 0.0])[:, None, None, None]) ** 2).sum(axis=0)) < 0.12
    t1w = np.where(wm, 1.0, 0.65) * brain + rng.normal(0, 0.02, shape) * brain
    flair = np.where(wm, 1.0, 1.2) * brain + 0.8 * lesion + rng.normal(0, 0.02, shape) * brain
    psr = (np.where(wm, 0.11, 0.075) - 0.05 * lesion) * brain
    img = lambda a, dt=np.float32: nib.Nifti1Image(a.astype(dt), affine)  # noqa: E731
    return {
        "t1w": img(t1w), "flair": img(flair), "psr": img(psr),
        "brain_mask": img(brain, np.uint8), "lesion_mask": img(lesion & brain, np.uint8),
        "wm_mask": img(wm, np.uint8),
    }


def write_session(folder: Path, images: dict[str, nib.Nifti1Image]) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    row = {}
    for name, image in images.items():
        save_image(image, folder / f"{name}.nii.gz")
        row[name] = str((folder / f"{name}.nii.gz"))
    return row


def two_subject_manifest(root: Path, shape=(28, 30, 26)) -> Path:
    """Two MS subjects with one session each (ellipsoid phantoms of seeds 0 and 1), written under `root`."""
    rows = []
    for i, subject in enumerate(["s1", "s2"]):
        row = write_session(root / subject / "a", ellipsoid_session(shape=shape, seed=i))
        rows.append({"subject": subject, "session": "a", "group": "MS", **row})
    return write_manifest(root / "manifest.csv", rows)


@pytest.fixture
def small_manifest(tmp_path: Path) -> Path:
    """A manifest of two subjects, three sessions, written as real NIfTI files."""
    rows = []
    for i, (subject, session) in enumerate([("s1", "a"), ("s1", "b"), ("s2", "a")]):
        row = write_session(tmp_path / subject / session, ellipsoid_session(seed=i))
        rows.append({"subject": subject, "session": session, "group": "MS",
                     **{k: str(Path(v).relative_to(tmp_path)) for k, v in row.items()}})
    return write_manifest(tmp_path / "manifest.csv", rows)
