"""Lesion regions of interest for the tissue-contrast protocol: each lesion, its proximal and its distal NAWM.

Per lesion (a 26-connected component of the lesion mask):
- lesion: its voxels;
- pNAWM (proximal normal-appearing WM): white matter in a ring `ring_mm` wide around the lesion's safety margin
  (`margin_voxels` voxels around every lesion are left out: partial volume at lesion borders), i.e. outside every
  lesion and margin; the ring is measured from the margin so that its width does not depend on the voxel size;
- dNAWM (distal NAWM): the lesion mirrored across the mid-sagittal plane, restricted to white matter that is not
  within `ring_mm` of any lesion's margin (so it is outside every lesion, its margin and every pNAWM ring).
`roi_means` reduces a PSR map to one value per ROI; `contrast_auc` and `lesion_bias` compare those values.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import numpy as np
from scipy import ndimage, optimize
from nibabel.affines import apply_affine
from sklearn.metrics import roc_auc_score, roc_curve

from demist.data.nifti import voxel_size
from demist.errors import DemistError

logger = logging.getLogger(__name__)

#: A lesion, pNAWM or dNAWM region smaller than this is too small for a mean; its lesion is left out.
MIN_ROI_VOXELS = 5
RING_MM = 4.0  # the proximal-NAWM ring's width for callers without a config: the presets' [evaluation] ring_mm

Plane = Mapping[str, Sequence[float]]
"""A plane in world mm: {"point": [x, y, z], "normal": [nx, ny, nz]} (the normal need not be unit length)."""

REGIONS = ("lesion", "pnawm", "dnawm")
DISTANCE_TOLERANCE_MM = 1e-6  # voxel sizes from an oblique affine carry rounding noise; 3.0000000001 mm is 3 mm
FULL_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26-connectivity


@dataclass(frozen=True)
class LesionROI:
    """One lesion and its two reference regions, as flat (C-order) voxel indices into a volume of `shape`."""

    label: int
    shape: tuple[int, int, int]
    centroid_world: tuple[float, float, float]
    lesion: np.ndarray
    pnawm: np.ndarray
    dnawm: np.ndarray

    def mask(self, region: Literal["lesion", "pnawm", "dnawm"]) -> np.ndarray:
        """Boolean volume of one region."""
        out = np.zeros(self.shape, dtype=bool)
        out.flat[getattr(self, region)] = True
        return out


def _check_plane(plane: Plane) -> tuple[np.ndarray, np.ndarray]:
    try:
        point = np.asarray(plane["point"], dtype=float).reshape(3)
        normal = np.asarray(plane["normal"], dtype=float).reshape(3)
    except (KeyError, TypeError, ValueError):
        raise DemistError(
            f"plane {plane!r}: not understood; expected {{'point': [x, y, z], 'normal': [nx, ny, nz]}}"
        ) from None
    norm = np.linalg.norm(normal)
    if not (np.all(np.isfinite(point)) and np.isfinite(norm) and norm > 0):
        raise DemistError(f"plane {plane!r}: point or normal not finite, or normal zero; expected a valid plane")
    return point, normal / norm


def mirror_matrix(plane: Plane) -> np.ndarray:
    """4×4 world-space reflection across `plane`: p ↦ p − 2((p − p0)·n)n."""
    point, normal = _check_plane(plane)
    matrix = np.eye(4)
    matrix[:3, :3] -= 2.0 * np.outer(normal, normal)
    matrix[:3, 3] = 2.0 * np.dot(point, normal) * normal
    return matrix


def _voxel_mirror(affine: np.ndarray, plane: Plane) -> np.ndarray:
    """The reflection across `plane` expressed on the voxel grid of `affine` (voxel → mirrored voxel)."""
    return np.linalg.inv(affine) @ mirror_matrix(plane) @ affine


def _check_affine(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-8:
        raise DemistError(f"affine {affine.tolist()}: not a finite invertible 4×4 voxel-to-world matrix")
    return affine


def estimate_midsagittal_plane(
    brain_mask: np.ndarray, affine: np.ndarray, max_tilt_deg: float = 15.0
) -> dict[str, list[float]]:
    """Estimate the mid-sagittal plane from the left–right symmetry of a brain mask.

    Starts from the plane through the mask's world centroid with the RAS x axis as normal, then searches tilts of
    the normal toward y and z (up to `max_tilt_deg`, a 3° grid, then Nelder–Mead with the offset free) for the
    plane whose mirror image of the mask best overlaps the (Gaussian-smoothed, σ = 2 voxels) mask. Returns
    {"point": [x, y, z], "normal": [nx, ny, nz]} in world mm, unit normal pointing to +x (right).
    """
    # No maintained library estimates a symmetry plane from a mask, hence this small search.
    mask = np.asarray(brain_mask) > 0
    affine = _check_affine(affine)
    if mask.ndim != 3 or mask.sum() < 10:
        raise DemistError(f"brain mask: shape {mask.shape} with {int(mask.sum())} voxels; expected a 3D brain mask")
    smooth = ndimage.gaussian_filter(mask.astype(np.float32), sigma=2.0)
    ijk = np.argwhere(mask)
    centre = apply_affine(affine, ijk.mean(axis=0))
    step = max(1, len(ijk) // 40_000)  # a deterministic subsample keeps each evaluation a few milliseconds
    points = ijk[::step].astype(float)

    def plane_of(params: np.ndarray) -> dict[str, list[float]]:
        tilt_y, tilt_z, offset = params
        normal = np.array([1.0, np.tan(np.radians(tilt_y)), np.tan(np.radians(tilt_z))])
        normal /= np.linalg.norm(normal)
        return {"point": (centre + offset * normal).tolist(), "normal": normal.tolist()}

    def overlap_loss(params: np.ndarray) -> float:
        if max(abs(params[0]), abs(params[1])) > max_tilt_deg:
            return 1.0
        mirrored = apply_affine(_voxel_mirror(affine, plane_of(params)), points)
        return -float(ndimage.map_coordinates(smooth, mirrored.T, order=1, mode="constant").mean())

    angles = np.arange(-max_tilt_deg, max_tilt_deg + 1e-9, 3.0)
    grid = [np.array([a, b, 0.0]) for a in angles for b in angles]
    start = min(grid, key=overlap_loss)
    best = optimize.minimize(overlap_loss, start, method="Nelder-Mead", options={"xatol": 0.05, "fatol": 1e-6})
    plane = plane_of(best.x if best.fun <= overlap_loss(start) else start)
    logger.info("mid-sagittal plane: point %s mm, normal %s", np.round(plane["point"], 2), np.round(plane["normal"], 4))
    return plane


def _mirror_of_component(
    labels: np.ndarray, label: int, box: tuple[slice, ...], affine: np.ndarray, plane: Plane
) -> np.ndarray:
    """Flat indices of voxels whose mirror image (nearest voxel) belongs to component `label`.

    Pulling each candidate voxel back across the plane (rather than pushing lesion voxels forward) leaves no holes
    when the plane is oblique to the grid.
    """
    corners = np.array([[s.stop - 1 if far else s.start for s, far in zip(box, bits)] for bits in np.ndindex(2, 2, 2)])
    to_mirror = _voxel_mirror(affine, plane)
    mirrored = apply_affine(to_mirror, corners)
    low = np.clip(np.floor(mirrored.min(axis=0)).astype(int) - 1, 0, labels.shape)
    high = np.clip(np.ceil(mirrored.max(axis=0)).astype(int) + 2, 0, labels.shape)
    if np.any(high <= low):
        return np.empty(0, dtype=np.int64)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high)], indexing="ij"), axis=-1).reshape(-1, 3)
    source = np.rint(apply_affine(to_mirror, grid)).astype(int)
    inside = np.all((source >= 0) & (source < labels.shape), axis=1)
    hit = np.zeros(len(grid), dtype=bool)
    hit[inside] = labels[tuple(source[inside].T)] == label
    return np.ravel_multi_index(tuple(grid[hit].T), labels.shape)


def _flat_indices(local_mask: np.ndarray, offset: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Flat indices into the full volume of the True voxels of a mask cut out at `offset`."""
    return np.ravel_multi_index(tuple((np.argwhere(local_mask) + offset).T), shape)


def lesion_rois(
    lesion_mask: np.ndarray,
    wm_mask: np.ndarray,
    affine: np.ndarray,
    plane: Plane | None = None,
    ring_mm: float = RING_MM,
    min_voxels: int = MIN_ROI_VOXELS,
    margin_voxels: int = 1,
    brain_mask: np.ndarray | None = None,
    drops: Counter | None = None,
) -> list[LesionROI]:
    """Lesion, pNAWM and dNAWM voxels of every lesion with at least `min_voxels` voxels in each region.

    `lesion_mask`, `wm_mask` (and `brain_mask`) are 3D arrays on the grid of `affine` (voxel → world mm); voxels > 0
    are inside. Distances use the voxel size from the affine (`scipy.ndimage.distance_transform_edt` with that
    sampling; exact for orthogonal grids). Without `plane`, it is estimated from `brain_mask` (or, failing that,
    from WM ∪ lesions) by `estimate_midsagittal_plane`. Lesions whose lesion, pNAWM or dNAWM region is smaller than
    `min_voxels` are dropped and the reason is logged, and counted in `drops` when given (by the first region that
    is too small: "lesion", "pNAWM" or "dNAWM").
    """
    lesion = np.asarray(lesion_mask) > 0
    wm = np.asarray(wm_mask) > 0
    affine = _check_affine(affine)
    if lesion.ndim != 3 or wm.shape != lesion.shape:
        raise DemistError(
            f"lesion_rois: lesion mask {lesion.shape} and WM mask {wm.shape}; expected two 3D masks of one shape"
        )
    if not (ring_mm > 0 and min_voxels >= 1 and margin_voxels >= 0):
        raise DemistError(f"lesion_rois: ring_mm={ring_mm}, min_voxels={min_voxels}, margin_voxels={margin_voxels}; "
                          "expected ring_mm > 0, min_voxels ≥ 1, margin_voxels ≥ 0")
    if plane is None:
        reference = wm | lesion if brain_mask is None else np.asarray(brain_mask) > 0
        if reference.shape != lesion.shape:
            raise DemistError(f"lesion_rois: brain mask {reference.shape} differs from lesion mask {lesion.shape}")
        plane = estimate_midsagittal_plane(reference, affine)
    _check_plane(plane)

    spacing = voxel_size(affine)
    labels, count = ndimage.label(lesion, structure=FULL_CONNECTIVITY)
    margin = _with_margin(lesion, margin_voxels)
    nawm = wm & ~margin
    reach_mm = ring_mm + DISTANCE_TOLERANCE_MM
    distal = nawm & (ndimage.distance_transform_edt(~margin, sampling=spacing) > reach_mm)
    pad_voxels = np.ceil(ring_mm / spacing).astype(int) + margin_voxels + 1

    rois: list[LesionROI] = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        ring_box = tuple(
            slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, pad, n in zip(box, pad_voxels, lesion.shape)
        )
        own = labels[ring_box] == label
        near = ndimage.distance_transform_edt(~_with_margin(own, margin_voxels), sampling=spacing) <= reach_mm
        offset = np.array([s.start for s in ring_box])
        lesion_idx = _flat_indices(own, offset, lesion.shape)
        pnawm_idx = _flat_indices(near & nawm[ring_box], offset, lesion.shape)
        mirror_idx = _mirror_of_component(labels, label, box, affine, plane)
        dnawm_idx = mirror_idx[distal.flat[mirror_idx]]
        centroid = apply_affine(affine, np.argwhere(own).mean(axis=0) + offset)
        sizes = {"lesion": lesion_idx.size, "pNAWM": pnawm_idx.size, "dNAWM": dnawm_idx.size}
        small = [f"{name} has {n} voxels" for name, n in sizes.items() if n < min_voxels]
        if small:
            logger.debug("lesion %d at %s mm dropped: %s (< min_voxels=%d)", label, np.round(centroid, 1),
                         ", ".join(small), min_voxels)
            if drops is not None:
                drops[next(name for name, n in sizes.items() if n < min_voxels)] += 1
            continue
        rois.append(LesionROI(label, lesion.shape, tuple(float(c) for c in centroid), lesion_idx, pnawm_idx, dnawm_idx))
    dropped = "" if len(rois) == count else f" (others: a region under {min_voxels} voxels; details at debug level)"
    logger.info("lesion ROIs: kept %d of %d lesions%s", len(rois), count, dropped)
    return rois


def _with_margin(lesion: np.ndarray, margin_voxels: int) -> np.ndarray:
    if not margin_voxels:
        return lesion
    return ndimage.binary_dilation(lesion, FULL_CONNECTIVITY, iterations=margin_voxels)


def roi_means(image: np.ndarray, rois: Sequence[LesionROI]) -> np.ndarray:
    """Mean of `image` (e.g. PSR) over each ROI's lesion, pNAWM and dNAWM: an (n_lesions, 3) array."""
    image = np.asarray(image)
    if any(roi.shape != image.shape for roi in rois):
        raise DemistError(f"roi_means: image shape {image.shape} differs from the ROIs' {rois[0].shape}")
    flat = image.reshape(-1)
    means = [[flat[getattr(roi, region)].mean(dtype=np.float64) for region in REGIONS] for roi in rois]
    return np.array(means, dtype=np.float64).reshape(len(rois), len(REGIONS))


def _pairwise_auc(lesion: np.ndarray, references: np.ndarray) -> float:
    """P(lesion < reference) + ½·P(tie) over all pairs: the AUC of score −PSR in its Mann–Whitney form."""
    difference = references.reshape(1, -1) - lesion.reshape(-1, 1)
    return float(np.mean(difference > 0) + 0.5 * np.mean(difference == 0))


def _auc_with_ci(lesion: np.ndarray, references: np.ndarray, boot: Sequence[np.ndarray]) -> dict[str, object]:
    """AUC, bootstrap 95 % CI and ROC points for lesions (positive) against the (n, m) reference columns."""
    y_true = np.r_[np.ones(len(lesion)), np.zeros(references.size)]
    score = -np.r_[lesion, references.reshape(-1)]
    auc = float(roc_auc_score(y_true, score))
    fpr, tpr, _ = roc_curve(y_true, score)
    # Resamples use the pairwise form (the same number as roc_auc_score, without its per-call overhead).
    resampled = np.array([_pairwise_auc(lesion[rows], references[rows]) for rows in boot])
    low, high = np.percentile(resampled, [2.5, 97.5]) if len(resampled) else (np.nan, np.nan)
    return {"auc": auc, "ci95": (float(low), float(high)), "fpr": fpr.tolist(), "tpr": tpr.tolist()}


#: Fewer patients give no AUC interval: two patients have only three distinct resamples, and a percentile interval
#: over so few is narrower than the lesion-level one it replaces, not wider.
MIN_BOOTSTRAP_PATIENTS = 5


def _patient_resamples(patients: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """`n_boot` cluster-bootstrap resamples: patients drawn with replacement, each with all of its lesions (one
    patient's lesions share one map and one level, so they are not independent draws). None with fewer than
    MIN_BOOTSTRAP_PATIENTS patients."""
    groups = [np.flatnonzero(patients == p) for p in np.unique(patients)]
    if len(groups) < MIN_BOOTSTRAP_PATIENTS:
        return []
    draws = np.random.default_rng(seed).integers(0, len(groups), size=(n_boot, len(groups)))
    return [np.concatenate([groups[g] for g in draw]) for draw in draws]


def contrast_auc(
    lesion_means: np.ndarray, pnawm_means: np.ndarray, dnawm_means: np.ndarray, n_boot: int = 1000, seed: int = 0,
    patients: Sequence[str] | np.ndarray | None = None,
) -> dict[str, object]:
    """How well per-lesion mean PSR separates lesions from their proximal and distal NAWM.

    Lesions are the positive class and the score is −PSR (demyelinated tissue has the LOWER PSR), so AUC is the
    probability that a lesion's mean PSR is below a reference region's (ties count ½); 0.5 is chance, 1 perfect.
    Returns {"n_lesions": n, "pnawm": …, "dnawm": …, "combined": …}: lesions against pNAWM, against dNAWM, and
    against both pooled; each entry is {"auc", "ci95": (low, high), "fpr", "tpr"} with ROC points from
    `sklearn.metrics.roc_curve` for plotting and a percentile bootstrap CI over `n_boot` resamples. With `patients`
    (one label per lesion) the resamples draw patients, each with all its lesions and their references, and the CI
    is NaN with fewer than MIN_BOOTSTRAP_PATIENTS patients; without, they draw lesions as if independent. Use the
    same `seed` for every method so they share resamples.
    """
    columns = [np.asarray(v, dtype=np.float64).reshape(-1) for v in (lesion_means, pnawm_means, dnawm_means)]
    n = len(columns[0])
    if n == 0 or any(len(c) != n for c in columns):
        raise DemistError(
            f"contrast_auc: {[len(c) for c in columns]} lesion/pNAWM/dNAWM means; expected n ≥ 1 of each"
        )
    if not all(np.all(np.isfinite(c)) for c in columns):
        raise DemistError("contrast_auc: NaN or infinite ROI means; expected finite values")
    if n_boot < 0:
        raise DemistError(f"contrast_auc: n_boot={n_boot}; expected ≥ 0")
    if patients is not None and len(patients) != n:
        raise DemistError(f"contrast_auc: {len(patients)} patient labels for {n} lesions; expected one per lesion")
    lesion, pnawm, dnawm = columns
    if patients is None:
        boot: Sequence[np.ndarray] = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    else:
        boot = _patient_resamples(np.asarray(patients).astype(str), n_boot, seed)
    return {
        "n_lesions": n,
        "pnawm": _auc_with_ci(lesion, pnawm[:, None], boot),
        "dnawm": _auc_with_ci(lesion, dnawm[:, None], boot),
        "combined": _auc_with_ci(lesion, np.stack([pnawm, dnawm], axis=1), boot),
    }


def auc_text(entry: Mapping[str, object]) -> str:
    """"AUC [low, high]" of one `contrast_auc` entry; "[—]" where the CI is undefined (no resamples: fewer than
    MIN_BOOTSTRAP_PATIENTS patients, or a bootstrap of 0)."""
    low, high = entry["ci95"]  # type: ignore[misc]
    if low is None or not np.isfinite(low):
        return f"{entry['auc']:.3f} [—]"
    return f"{entry['auc']:.3f} [{low:.3f}, {high:.3f}]"


def lesion_bias(pred_means: np.ndarray, true_means: np.ndarray) -> dict[str, float]:
    """Mean error of predicted ROI means (rows from `roi_means`) against the true ones, in the images' units.

    Keys: "lesion", "pnawm", "dnawm" = mean(pred − true) per region; "contrast_pnawm", "contrast_dnawm" = mean
    error of the relative lesion contrast 1 − lesion/NAWM (negative: the method flattens lesions).
    """
    pred = np.asarray(pred_means, dtype=np.float64)
    true = np.asarray(true_means, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 2 or pred.shape[1] != len(REGIONS) or len(pred) == 0:
        raise DemistError(f"lesion_bias: shapes {pred.shape} and {true.shape}; expected two equal (n ≥ 1, 3) arrays")
    bias = {region: float(np.mean(pred[:, i] - true[:, i])) for i, region in enumerate(REGIONS)}
    with np.errstate(divide="ignore", invalid="ignore"):
        for i, region in ((1, "pnawm"), (2, "dnawm")):
            contrast_error = (1 - pred[:, 0] / pred[:, i]) - (1 - true[:, 0] / true[:, i])
            bias[f"contrast_{region}"] = float(np.mean(contrast_error))
    return bias
