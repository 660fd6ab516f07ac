"""Voxelwise features for the linear baseline: T1w, FLAIR, their smoothed copies inside the brain, and products.

Smoothing is a normalised convolution: G(image · brain) / G(brain), evaluated inside the brain only, so the zero
background never darkens voxels near the brain's edge (a plain Gaussian would, and the model would mistake cortex
for CSF). Widths are in mm and converted with the grid's voxel sizes, so the same model works on any grid spacing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from scipy import ndimage

from demist.data.nifti import voxel_size
from demist.data.preprocess import PreparedSession
from demist.errors import DemistError

#: Default Gaussian widths (σ, mm) of the smoothed copies.
DEFAULT_SIGMAS_MM = (2.0, 4.0, 8.0)


@dataclass(frozen=True)
class FeatureSpec:
    """Which features the linear model sees; stored with its weights so prediction rebuilds exactly the same."""

    sigmas_mm: tuple[float, ...] = DEFAULT_SIGMAS_MM
    products: bool = True  # second-order terms of the unsmoothed inputs: T1w², FLAIR², T1w·FLAIR

    def __post_init__(self) -> None:
        if any(not np.isfinite(s) or s <= 0 for s in self.sigmas_mm):
            raise DemistError(f"feature sigmas {self.sigmas_mm}: expected positive widths in mm")

    @property
    def names(self) -> list[str]:
        """Feature names, in the order of the model's coefficients."""
        names = ["t1w", "flair"]
        for sigma in self.sigmas_mm:
            names += [f"t1w_s{sigma:g}mm", f"flair_s{sigma:g}mm"]
        if self.products:
            names += ["t1w^2", "flair^2", "t1w*flair"]
        return names


def smooth_in_mask(volume: np.ndarray, mask: np.ndarray, sigma_vox: np.ndarray | float,
                   mask_weight: np.ndarray | None = None) -> np.ndarray:
    """Gaussian smoothing of `volume` restricted to `mask` (normalised convolution); zero outside the mask.

    `mask_weight` is G(mask) for the same σ: pass it to reuse it across volumes.
    """
    weight = mask.astype(np.float32)
    if mask_weight is None:
        mask_weight = ndimage.gaussian_filter(weight, sigma_vox, mode="constant", cval=0.0)
    smoothed = ndimage.gaussian_filter(volume.astype(np.float32) * weight, sigma_vox, mode="constant", cval=0.0)
    out = np.zeros_like(smoothed)
    # Inside the mask the weight is at least the voxel's own kernel weight (> 0): the division is safe there.
    np.divide(smoothed, mask_weight, out=out, where=mask)
    return out


def iter_feature_volumes(session: PreparedSession, spec: FeatureSpec) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(name, volume)` in `spec.names` order, one volume at a time so memory stays at a few volumes."""
    brain = session.brain
    t1w, flair = session.t1w.astype(np.float32), session.flair.astype(np.float32)
    yield "t1w", t1w
    yield "flair", flair
    voxel = voxel_size(session.grid.affine)
    for sigma in spec.sigmas_mm:
        sigma_vox = sigma / voxel
        mask_weight = ndimage.gaussian_filter(brain.astype(np.float32), sigma_vox, mode="constant", cval=0.0)
        yield f"t1w_s{sigma:g}mm", smooth_in_mask(t1w, brain, sigma_vox, mask_weight)
        yield f"flair_s{sigma:g}mm", smooth_in_mask(flair, brain, sigma_vox, mask_weight)
    if spec.products:
        yield "t1w^2", t1w * t1w
        yield "flair^2", flair * flair
        yield "t1w*flair", t1w * flair


def feature_matrix(session: PreparedSession, spec: FeatureSpec, index: np.ndarray | None = None) -> np.ndarray:
    """(N, F) float64 features at brain voxels: all of them in C order, or the flat voxel indices `index`."""
    flat = np.flatnonzero(session.brain) if index is None else np.asarray(index)
    columns = [volume.reshape(-1)[flat] for _, volume in iter_feature_volumes(session, spec)]
    return np.stack(columns, axis=1).astype(np.float64)
