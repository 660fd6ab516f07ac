"""One session from raw NIfTI to synthesis-ready files: N4 → brain mask → FLAIR → T1w rigid registration.

Everything stays on the T1w's native grid and affine. The outputs appear together or not at all: they are written
into a hidden folder beside the destination and renamed into place at the end (the transform last, so a session
counts as done when its transform exists).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from demist.data.nifti import load_image, save_image, scanner_image, voxel_size
from demist.data.space import MIN_OVERLAP, overlap_fraction
from demist.errors import DemistError
from demist.preprocessing.steps import bias_correct, extract_brain, register_rigid, resample_onto
from demist.version import __version__

log = logging.getLogger(__name__)

MIN_BRAIN_ML = 500.0  # a brain mask smaller than this is a failed extraction (an adult brain is ~1100-1600 ml)
MIN_EDGE_CONTRAST = 1.5  # mean T1w inside the mask over the 4 mm around it: ~4 for a brain (CSF, skull), ~1 for noise
MIN_EXTENT_MM = 80.0  # a head scan spans more than this along every axis; a localizer or a slab does not


@dataclass(frozen=True)
class SessionFiles:
    """Where one preprocessed session lives. Default names suit a manifest folder; BIDS derivatives pass theirs."""

    t1w: Path
    flair: Path
    brain_mask: Path
    transform: Path  # JSON: the FLAIR → T1w transform (RAS), and provenance

    @classmethod
    def in_folder(cls, folder: Path) -> SessionFiles:
        folder = Path(folder)
        return cls(folder / "t1w.nii.gz", folder / "flair.nii.gz", folder / "brain_mask.nii.gz",
                   folder / "flair_to_t1w.json")

    @property
    def all(self) -> tuple[Path, ...]:
        return (self.t1w, self.flair, self.brain_mask, self.transform)

    def done(self) -> bool:
        return all(p.is_file() for p in self.all)


def preprocess_session(t1w_path: Path, flair_path: Path, files: SessionFiles, device: str = "cpu",
                       key: str = "session") -> dict[str, float]:
    """Preprocess one session into `files`; returns the seconds each step took."""
    t1w = _head_volume(load_image(t1w_path, f"t1w of {key}"), f"t1w {t1w_path}")
    flair = _head_volume(load_image(flair_path, f"flair of {key}"), f"flair {flair_path}")
    overlap = overlap_fraction(flair, t1w)
    if overlap < MIN_OVERLAP:
        raise DemistError(f"t1w {t1w_path} and flair {flair_path}: their fields of view share {overlap:.0%} of the "
                          f"smaller one; expected two scans of the same head (at least {MIN_OVERLAP:.0%})")
    seconds: dict[str, float] = {}

    def timed(step: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[step] = time.perf_counter() - start
        log.info("%s: %s %.1f s", key, step, seconds[step])
        return out

    created = sorted({a for p in files.all for a in (p.parent, *p.parent.parents) if not a.exists()},
                     key=lambda a: len(a.parts))  # the folders this call makes, shallowest first
    for parent in created:
        parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demist-preprocess-", dir=files.transform.parent))
    done = False
    try:
        t1w_n4 = timed("bias_t1w", bias_correct, t1w)
        brain = timed("brain_mask", extract_brain, t1w_n4, device)
        brain_ml = float(brain.sum() * np.prod(t1w.header.get_zooms()[:3]) / 1000.0)
        if brain_ml < MIN_BRAIN_ML:
            raise DemistError(f"t1w of {key}: brain extraction found {brain_ml:.0f} ml of brain; expected an adult "
                              f"head T1w (at least {MIN_BRAIN_ML:.0f} ml)")
        contrast = _edge_contrast(t1w_n4, brain)
        if contrast < MIN_EDGE_CONTRAST:
            raise DemistError(f"t1w of {key}: brain extraction found no brain (the mask is {contrast:.2f}x as bright "
                              f"as the 4 mm around it; a brain in a head T1w is ~4x, expected at least "
                              f"{MIN_EDGE_CONTRAST:g}x)")
        flair_n4 = timed("bias_flair", bias_correct, flair)
        t1w_to_flair = timed("register", register_rigid, t1w_n4, flair_n4, brain, staging / "flair_to_t1w.mat")
        flair_on_t1w = timed("resample", resample_onto, flair_n4, t1w_n4, t1w_to_flair)

        mask = scanner_image(brain.astype(np.uint8), t1w.affine)
        staged = SessionFiles.in_folder(staging)
        save_image(t1w_n4, staged.t1w)
        save_image(flair_on_t1w, staged.flair)
        save_image(mask, staged.brain_mask)
        staged.transform.write_text(json.dumps(_provenance(t1w_path, flair_path, t1w_to_flair, brain_ml, seconds),
                                               indent=1) + "\n")
        for source, target in zip(staged.all, files.all):
            source.replace(target)  # the transform is last: its presence marks the session done
        itk = files.transform.with_suffix(".mat")
        (staging / "flair_to_t1w.mat").replace(itk)
        done = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in reversed(created if not done else []):  # a failed session leaves no empty folders either
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
    return seconds


def _edge_contrast(t1w: nib.Nifti1Image, brain: np.ndarray) -> float:
    """How much brighter the mask is than the 4 mm shell around it (deepbet finds a plausible volume even in noise)."""
    from scipy import ndimage

    spacing = float(voxel_size(t1w.affine).min())
    shell = ndimage.binary_dilation(brain, iterations=max(1, int(np.ceil(4.0 / spacing)))) & ~brain
    data = np.asarray(t1w.dataobj, dtype=np.float32)
    outside = float(data[shell].mean()) if shell.any() else 0.0
    return float(data[brain].mean()) / outside if outside > 0 else float("inf")


def _head_volume(img: nib.Nifti1Image, what: str) -> nib.Nifti1Image:
    """Refuse a localizer or a slab: a head scan covers at least MIN_EXTENT_MM along every axis."""
    extent = np.array(img.shape[:3]) * voxel_size(img.affine)
    if extent.min() < MIN_EXTENT_MM:
        raise DemistError(f"{what}: covers {' x '.join(f'{e:.0f}' for e in extent)} mm (shape {img.shape}); expected "
                          f"a 3D head volume of at least {MIN_EXTENT_MM:.0f} mm along every axis, not a localizer")
    return img


def _provenance(t1w: Path, flair: Path, t1w_to_flair: np.ndarray, brain_ml: float,
                seconds: dict[str, float]) -> dict:
    return {
        "flair_to_t1w_ras": [[round(float(v), 6) for v in row] for row in np.linalg.inv(t1w_to_flair)],
        "convention": "world (RAS mm) point of the input FLAIR -> world point of the same anatomy in the T1w",
        "inputs": {"t1w": str(t1w), "flair": str(flair)},
        "brain_volume_ml": round(brain_ml, 1),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "tools": _tool_versions(),
        "demist_version": __version__,
    }


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("antspyx", "deepbet"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "unknown"
    return out
