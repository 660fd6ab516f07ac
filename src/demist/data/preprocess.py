"""From a session's NIfTI files to model-ready arrays, and back to the T1w's native grid.

The steps follow the paper: every image onto the T1w's anatomy (refused when its field of view does not overlap the
T1w's), then one RAS-aligned isotropic model grid around the brain, padded to the networks' divisor. A FLAIR, PSR map
or lesion/WM mask on another grid than the T1w's goes straight onto the model grid, not through the T1w's grid first:
one interpolation, not two. (The brain mask alone goes through the T1w's grid: the native brain sets the model grid
and where outputs are zero.) T1w and FLAIR are scaled to [0, 1] by their 0–99.5th percentiles inside the brain
(`tiny`: 1–99.5th, taken 4 mm inside the mask's edge); PSR is divided by the fixed `psr_range`, so outputs map back
to PSR units exactly. `ModelGrid.to_native` undoes the geometry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from demist.config_sections import DataConfig
from demist.data.manifest import SessionRecord
from demist.data.nifti import load_image, load_mask
from demist.data.space import (ModelGrid, check_brain_coverage, into_grid, model_grid_for, onto_model_grid,
                               require_overlap)
from demist.errors import DemistError

log = logging.getLogger(__name__)

#: An input counts as skull-stripped when at least this fraction of its voxels is exactly zero.
MIN_ZERO_BACKGROUND = 0.2
#: The mask's interior is used for the percentiles only while it keeps at least this fraction of the brain.
MIN_INTERIOR_FRACTION = 0.5


@dataclass
class PreparedSession:
    """One session on the model grid. Intensities are float32; masks are bool; `psr` is PSR / psr_range.
    `native_brain` is the brain on the T1w's own grid, which every output written there is cut to (None where a
    session is only trained on)."""

    key: str
    t1w: np.ndarray
    flair: np.ndarray
    brain: np.ndarray
    grid: ModelGrid
    native_brain: np.ndarray | None = None
    psr: np.ndarray | None = None
    lesion: np.ndarray | None = None
    wm: np.ndarray | None = None

    @property
    def condition(self) -> np.ndarray:
        """(2, D, H, W): T1w and FLAIR, the model's input channels."""
        return np.stack([self.t1w, self.flair])


def scale_percentiles(image: np.ndarray, brain: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map the `low`–`high` percentiles of the brain's intensities to 0–1 (not clipped above, as in the paper)."""
    lo, hi = np.percentile(image[brain], [low, high])
    if hi - lo <= 1e-12:
        raise DemistError(f"image is constant inside the brain ({lo:g}); expected contrast between tissues")
    return ((image - lo) / (hi - lo)).astype(np.float32)


def scaling_region(brain: np.ndarray, margin_vox: float) -> np.ndarray:
    """The voxels whose intensities set the T1w/FLAIR scaling: the brain eroded by `margin_vox` voxels, or the whole
    brain when that would leave less than `MIN_INTERIOR_FRACTION` of it (a small or thin mask)."""
    steps = int(round(margin_vox))
    if steps <= 0:
        return brain
    interior = ndimage.binary_erosion(brain, iterations=steps)
    if interior.sum() < MIN_INTERIOR_FRACTION * brain.sum():
        log.debug("brain mask: %d voxels inside a %d-voxel margin, under half the brain; scaling on the whole mask",
                  int(interior.sum()), steps)
        return brain
    return interior


def brain_from_background(t1w: nib.Nifti1Image, what: str) -> np.ndarray:
    """A brain mask from a skull-stripped image's constant background (zero, or the image's minimum: a background
    stored as 0 with a scl_inter reads as the intercept); refuse an image that is not skull-stripped."""
    data = np.asarray(t1w.dataobj)
    background = data == 0
    if np.mean(background) < MIN_ZERO_BACKGROUND:
        background = data == data.min()
    zero = float(np.mean(background))
    if zero < MIN_ZERO_BACKGROUND:
        raise DemistError(
            f"{what}: only {zero:.0%} of voxels are zero, so it does not look skull-stripped; "
            "pass a brain mask (--mask) or a skull-stripped image"
        )
    mask = ndimage.binary_fill_holes(~background)
    labels, n = ndimage.label(mask)
    if n > 1:  # keep the largest component: stray non-zero voxels are not brain
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return mask


def prepare_images(
    t1w: nib.Nifti1Image,
    flair: nib.Nifti1Image,
    cfg: DataConfig,
    brain: nib.Nifti1Image | None = None,
    psr: nib.Nifti1Image | None = None,
    lesion: nib.Nifti1Image | None = None,
    wm: nib.Nifti1Image | None = None,
    key: str = "session",
    names: dict[str, str] | None = None,
) -> PreparedSession:
    """Bring already-loaded images onto one model grid (see the module docstring)."""
    names = names or {}
    name = lambda k: names.get(k, f"{k} of {key}")  # noqa: E731 - a label for error messages
    require_overlap(flair, t1w, name("flair"))
    brain_native = (
        np.asarray(into_grid(brain, t1w, name("brain_mask"), is_mask=True).dataobj) > 0
        if brain is not None
        else brain_from_background(t1w, name("t1w"))
    )
    if not brain_native.any():
        if brain is None:
            raise DemistError(f"{name('t1w')}: every voxel is background, so no brain to synthesize in; expected a "
                              "skull-stripped T1w, or a brain mask (--mask)")
        raise DemistError(f"{name('brain_mask')}: no brain voxel inside the T1w's field of view")
    check_brain_coverage(flair, t1w, brain_native, name("flair"))
    grid = model_grid_for(t1w, brain_native, cfg.spacing, cfg.divisor)
    brain_img = nib.Nifti1Image(brain_native.astype(np.uint8), t1w.affine)
    brain_m = onto_model_grid(brain_img, grid, is_mask=True)
    t1w_m = onto_model_grid(t1w, grid) * brain_m
    flair_m = onto_model_grid(flair, grid) * brain_m
    region = scaling_region(brain_m, cfg.percentile_margin_mm / cfg.spacing)
    session = PreparedSession(
        key=key,
        t1w=scale_percentiles(t1w_m, region, cfg.percentile_low, cfg.percentile_high) * brain_m,
        flair=scale_percentiles(flair_m, region, cfg.percentile_low, cfg.percentile_high) * brain_m,
        brain=brain_m,
        grid=grid,
        native_brain=brain_native,
    )
    if psr is not None:
        require_overlap(psr, t1w, name("psr"))
        check_brain_coverage(psr, t1w, brain_native, name("psr"))
        session.psr = onto_model_grid(psr, grid) / np.float32(cfg.psr_range)
    if lesion is not None:
        require_overlap(lesion, t1w, name("lesion_mask"))
        session.lesion = onto_model_grid(lesion, grid, is_mask=True)
    if wm is not None:
        require_overlap(wm, t1w, name("wm_mask"))
        session.wm = onto_model_grid(wm, grid, is_mask=True)
    return session


def prepare_session(record: SessionRecord, cfg: DataConfig, need_target: bool = True) -> PreparedSession:
    """Load and prepare one manifest session; `need_target` requires its PSR map."""
    if need_target:
        record.require("psr")
    optional = lambda path, what, loader: loader(path, what) if path is not None else None  # noqa: E731
    prepared = prepare_images(
        t1w=load_image(record.t1w, f"t1w of {record.key}"),
        flair=load_image(record.flair, f"flair of {record.key}"),
        cfg=cfg,
        brain=optional(record.brain_mask, f"brain_mask of {record.key}", load_mask),
        psr=optional(record.psr if need_target else None, f"psr of {record.key}", load_image),
        lesion=optional(record.lesion_mask, f"lesion_mask of {record.key}", _load_binary),
        wm=optional(record.wm_mask, f"wm_mask of {record.key}", load_mask),
        key=record.key,
    )
    log.debug("prepared %s on a %s grid", record.key, prepared.grid.shape)
    return prepared


def _load_binary(path, what: str) -> nib.Nifti1Image:
    """A mask that may be empty (a healthy control's lesion mask)."""
    img = load_image(path, what)
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    return nib.Nifti1Image((np.asarray(img.dataobj) > 0.5).astype(np.uint8), img.affine, header)


def psr_to_native(psr_model: np.ndarray, grid: ModelGrid, psr_range: float,
                  brain: np.ndarray | None = None) -> nib.Nifti1Image:
    """A model-grid prediction (PSR / psr_range) as a PSR-unit image on the T1w's native grid; with `brain` (the
    model grid's), the edge of the brain is interpolated from inside it only (`ModelGrid.to_native`)."""
    return grid.to_native(np.asarray(psr_model, dtype=np.float32) * np.float32(psr_range), inside=brain)
