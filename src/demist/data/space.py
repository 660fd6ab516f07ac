"""Physical space: do two images cover the same anatomy, and moving volumes between grids.

Resampling is nibabel's (`nibabel.processing`): one interpolation per move, trilinear for intensities and nearest
neighbour for masks, zero outside the source's field of view.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from scipy import ndimage

from demist.data.nifti import load_image, voxel_size
from demist.errors import DemistError

logger = logging.getLogger(__name__)

#: A FLAIR (or PSR) on another grid must cover this fraction of the brain; below WARN_BRAIN_COVERAGE a warning says
#: how much of the brain lies outside it (a FLAIR that misses the lowest cerebellum is common).
MIN_BRAIN_COVERAGE, WARN_BRAIN_COVERAGE = 0.9, 0.99

#: Two grids whose affines differ by less than this (mm) are the same grid.
AFFINE_TOLERANCE_MM = 1e-3
#: Refuse to resample an image that covers less than this fraction of the reference's field of view.
MIN_OVERLAP = 0.25
#: Normalised interpolation takes the nearest masked value where the mask's interpolated weight is below this.
NORMALISED_MIN_WEIGHT = 1e-3
#: Header fields of the native image that describe its intensities, not its geometry, and their empty values:
#: outputs do not inherit them.
DISPLAY_FIELDS = {"cal_min": 0, "cal_max": 0, "descrip": b"", "aux_file": b"", "intent_code": 0, "intent_p1": 0,
                  "intent_p2": 0, "intent_p3": 0, "intent_name": b""}


def world_bounds(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box (mm) of a grid's voxel centres, padded by half a voxel."""
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in shape[:3]], indexing="ij")).reshape(3, -1).T
    world = nib.affines.apply_affine(affine, corners)
    return world.min(axis=0), world.max(axis=0)


def overlap_fraction(a: nib.Nifti1Image, b: nib.Nifti1Image) -> float:
    """Volume of the intersection of two world bounding boxes over the smaller box's volume."""
    lo_a, hi_a = world_bounds(a.shape, a.affine)
    lo_b, hi_b = world_bounds(b.shape, b.affine)
    inter = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None).prod()
    smaller = min((hi_a - lo_a).prod(), (hi_b - lo_b).prod())
    return float(inter / smaller) if smaller > 0 else 0.0


def same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image) -> bool:
    """True when both images have the same shape and (to 1 µm) the same affine."""
    return tuple(a.shape[:3]) == tuple(b.shape[:3]) and bool(np.allclose(a.affine, b.affine, atol=AFFINE_TOLERANCE_MM))


def require_overlap(img: nib.Nifti1Image, reference: nib.Nifti1Image, what: str) -> None:
    """Refuse an image whose field of view barely meets the reference's: not the same anatomy."""
    fraction = overlap_fraction(img, reference)
    if fraction < MIN_OVERLAP:
        raise DemistError(
            f"{what}: covers {fraction:.0%} of the reference image's physical space; expected the same anatomy "
            f"(check the affines: the images may not be co-registered)"
        )


def into_grid(img: nib.Nifti1Image, reference: nib.Nifti1Image, what: str, is_mask: bool = False) -> nib.Nifti1Image:
    """`img` on `reference`'s grid: returned as is when the grids match, resampled when they overlap, else refused."""
    if same_grid(img, reference):
        return img
    require_overlap(img, reference, what)
    moved = resample_from_to(img if is_mask else _as_float(img), (reference.shape[:3], reference.affine),
                             order=0 if is_mask else 1, cval=0.0)
    if is_mask:
        return nib.Nifti1Image((np.asarray(moved.dataobj) > 0.5).astype(np.uint8), reference.affine)
    return nib.Nifti1Image(np.asarray(moved.dataobj, dtype=np.float32), reference.affine)


def load_on_grid(path: Path, reference: nib.Nifti1Image, what: str, is_mask: bool = False,
                 onto: str = "the reference image", brain: np.ndarray | None = None) -> np.ndarray:
    """The volume at `path` on `reference`'s grid (`into_grid`; bool for masks, float32 otherwise); a resampling
    is logged, naming the reference as `onto`. With `brain` (a mask on `reference`'s grid), an image on another grid
    must cover it (`check_brain_coverage`)."""
    image = load_image(path, what)
    if not same_grid(image, reference):
        logger.warning("%s %s: not on the grid of %s; resampling it (%s)", what, path, onto,
                       "nearest neighbour" if is_mask else "trilinear")
    data = np.asarray(into_grid(image, reference, f"{what} image {path}", is_mask=is_mask).dataobj)
    if brain is not None:  # after into_grid, which refuses an image elsewhere in space first
        check_brain_coverage(image, reference, brain, f"{what} {path}")
    return data > 0.5 if is_mask else data.astype(np.float32, copy=False)


def check_brain_coverage(img: nib.Nifti1Image, reference: nib.Nifti1Image, brain: np.ndarray, what: str) -> None:
    """Refuse an image on another grid than `reference` whose field of view leaves part of `brain` (a mask on
    `reference`'s grid) out: a slab, a localizer, a map of another region."""
    if same_grid(img, reference):
        return
    covered = float(in_field_of_view(img, reference)[brain].mean())
    if covered < MIN_BRAIN_COVERAGE:
        raise DemistError(f"{what}: its field of view covers {covered:.1%} of the brain; expected the whole brain "
                          f"(at least {MIN_BRAIN_COVERAGE:.0%}), not a slab or a localizer")
    if covered < WARN_BRAIN_COVERAGE:
        logger.warning("%s: its field of view covers %.1f%% of the brain; the rest is read as zero", what,
                       100 * covered)


@dataclass(frozen=True)
class ModelGrid:
    """Where the model works (RAS, isotropic, cropped and padded) and the native grid it must return to."""

    affine: np.ndarray  # model grid voxel -> world
    shape: tuple[int, int, int]
    native_affine: np.ndarray
    native_shape: tuple[int, int, int]
    native_header: nib.Nifti1Header

    def to_native(self, volume: np.ndarray, is_mask: bool = False,
                  inside: np.ndarray | None = None) -> nib.Nifti1Image:
        """A model-grid volume resampled onto the native grid, with the native header's geometry (qform/sform codes
        kept) and none of its display or description fields (a T1w's window would hide a PSR map).

        With `inside` (a model-grid mask), native voxels near the mask's edge average only the values inside it
        (normalised interpolation), and those beyond its reach take the nearest value inside it: plain trilinear
        resampling of a masked map would pull them toward the zeros outside, and of an unmasked one toward whatever
        the model predicts beyond the brain."""
        if tuple(volume.shape) != self.shape:
            raise ValueError(f"volume shape {volume.shape} is not the model grid's {self.shape}")
        if is_mask:
            data = (self._resampled(volume, order=0) > 0.5).astype(np.uint8)
        elif inside is None:
            data = self._resampled(volume, order=1)
        else:
            weight = self._resampled(inside, order=1)
            inner = self._resampled(np.where(inside, volume, 0.0), order=1)
            # Far from every masked voxel (a thin structure the coarser grid missed): the nearest masked value.
            nearest = ndimage.distance_transform_edt(~np.asarray(inside, dtype=bool), return_distances=False,
                                                     return_indices=True)
            data = np.where(weight > NORMALISED_MIN_WEIGHT, inner / np.maximum(weight, NORMALISED_MIN_WEIGHT),
                            self._resampled(volume[tuple(nearest)], order=1)).astype(np.float32)
        header = self.native_header.copy()
        header.set_data_dtype(data.dtype)
        header.set_slope_inter(None, None)
        for field, empty in DISPLAY_FIELDS.items():
            header[field] = empty
        return nib.Nifti1Image(data, self.native_affine, header)

    def _resampled(self, volume: np.ndarray, order: int) -> np.ndarray:
        src = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), self.affine)
        moved = resample_from_to(src, (self.native_shape, self.native_affine), order=order, cval=0.0)
        return np.asarray(moved.dataobj, dtype=np.float32)


def model_grid_for(reference: nib.Nifti1Image, brain: np.ndarray, spacing: float, divisor: int,
                   margin_mm: float = 8.0) -> ModelGrid:
    """The model grid for a session: RAS axes, `spacing` mm voxels, the brain's bounding box plus a margin, each
    side padded to a multiple of `divisor` voxels (the networks' downsampling needs it)."""
    ijk = np.argwhere(brain)
    lo_vox, hi_vox = ijk.min(axis=0), ijk.max(axis=0)
    corners = np.array(np.meshgrid(*[[lo_vox[d], hi_vox[d]] for d in range(3)], indexing="ij")).reshape(3, -1).T
    world = nib.affines.apply_affine(reference.affine, corners)
    lo, hi = world.min(axis=0) - margin_mm, world.max(axis=0) + margin_mm
    extent = np.ceil((hi - lo) / spacing).astype(int) + 1
    shape = np.maximum(divisor, (np.ceil(extent / divisor) * divisor).astype(int))
    centre = (lo + hi) / 2
    origin = centre - (shape - 1) / 2 * spacing
    # Snap to the native lattice: a native grid already RAS at `spacing` maps voxel to voxel, with no interpolation.
    anchor = nib.affines.apply_affine(reference.affine, lo_vox)
    origin = anchor + np.round((origin - anchor) / spacing) * spacing
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin
    return ModelGrid(
        affine=affine,
        shape=tuple(int(s) for s in shape),
        native_affine=reference.affine.copy(),
        native_shape=tuple(int(s) for s in reference.shape[:3]),
        native_header=reference.header.copy(),
    )


def onto_model_grid(img: nib.Nifti1Image, grid: ModelGrid, is_mask: bool = False) -> np.ndarray:
    """Resample an image on any grid that overlaps the session's onto the model grid (trilinear; masks nearest)."""
    moved = resample_from_to(img if is_mask else _as_float(img), (grid.shape, grid.affine),
                             order=0 if is_mask else 1, cval=0.0)
    data = np.asarray(moved.dataobj)
    return data > 0.5 if is_mask else data.astype(np.float32)


def _as_float(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """nibabel resamples in the image's own dtype: an integer image would come back rounded."""
    if np.issubdtype(img.get_data_dtype(), np.floating):
        return img
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)


def in_field_of_view(img: nib.Nifti1Image, reference: nib.Nifti1Image) -> np.ndarray:
    """Which voxels of `reference`'s grid lie inside `img`'s field of view (bool, `reference`'s shape)."""
    to_img = np.linalg.inv(img.affine) @ reference.affine
    inside = np.ones(reference.shape[:3], dtype=bool)
    axes = [np.arange(n, dtype=np.float32) for n in reference.shape[:3]]
    for d in range(3):
        coordinate = (to_img[d, 0] * axes[0][:, None, None] + to_img[d, 1] * axes[1][None, :, None]
                      + to_img[d, 2] * axes[2][None, None, :] + to_img[d, 3])
        inside &= (coordinate >= -0.5) & (coordinate <= img.shape[d] - 0.5)
    return inside


def ras_view(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """`volume` with its axes permuted and flipped to the closest RAS orientation (for display: axis 2 is then
    inferior → superior, so `[:, :, z]` is an axial slice whatever order the scanner stored the voxels in)."""
    return nib.orientations.apply_orientation(np.asarray(volume), nib.orientations.io_orientation(affine))


def ras_voxel_size(affine: np.ndarray) -> np.ndarray:
    """The voxel size (mm) along each axis of `ras_view`."""
    return voxel_size(affine)[nib.orientations.io_orientation(affine)[:, 0].argsort()]


def ras_voxel(ijk: np.ndarray, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """Voxel indices (n, 3) of a volume of `shape` mapped to the indices of the same voxels in `ras_view`."""
    ijk = np.atleast_2d(ijk)
    out = np.empty_like(ijk)
    for axis, (target, flip) in enumerate(nib.orientations.io_orientation(affine).astype(int)):
        out[:, target] = shape[axis] - 1 - ijk[:, axis] if flip < 0 else ijk[:, axis]
    return out
