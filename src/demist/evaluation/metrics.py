"""Image-similarity metrics inside the brain: PSNR (raw and centred), SSIM, MSE, L1 and NCC.

Every metric is computed on arrays already scaled to [0, 1] by a *fixed* physical range (PSR / `psr_range`), so
numbers are comparable across subjects and return to PSR units by multiplying by that range. Nothing here
rescales per image.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from demist.errors import DemistError

METRICS = ("psnr", "psnr_centred", "ssim", "mse", "l1", "ncc")
"""The keys of `image_metrics`, in report order."""

HIGHER_IS_BETTER = {"psnr": True, "psnr_centred": True, "ssim": True, "ncc": True, "mse": False, "l1": False}

# SSIM settings of Wang et al. (2004) as commonly used for 3D MRI synthesis: an 11-voxel Gaussian window.
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_PAD = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # half-width of the Gaussian window: 5 voxels
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_inputs(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, data_range: float) -> np.ndarray:
    """Validate shapes, mask and range; return the mask as bool."""
    if pred.shape != target.shape or mask.shape != target.shape:
        raise DemistError(
            f"image_metrics: shapes differ (pred {pred.shape}, target {target.shape}, mask {mask.shape}); "
            "expected three arrays of the same shape"
        )
    if target.ndim not in (2, 3):
        raise DemistError(f"image_metrics: arrays are {target.ndim}D {target.shape}; expected 2D or 3D")
    if min(target.shape) < 2 * SSIM_PAD + 1:
        raise DemistError(
            f"image_metrics: shape {target.shape} is smaller than the {2 * SSIM_PAD + 1}-voxel SSIM window; "
            f"expected at least {2 * SSIM_PAD + 1} voxels per axis"
        )
    if not (np.isfinite(data_range) and data_range > 0):
        raise DemistError(f"image_metrics: data_range={data_range}; expected a positive finite number")
    mask = np.asarray(mask).astype(bool, copy=False)
    if not mask.any():
        raise DemistError("image_metrics: mask is empty; expected at least one voxel inside the brain")
    for name, image in (("pred", pred), ("target", target)):
        if not np.all(np.isfinite(image[mask])):
            raise DemistError(f"image_metrics: {name} has NaN or infinite values inside the mask; expected finite")
    return mask


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation (scipy's); NaN when either side is constant, where it is undefined (without scipy's
    warning)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.pearsonr(a.astype(np.float64), b.astype(np.float64)).statistic)


def _masked_ssim(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, data_range: float = 1.0) -> float:
    """Mean of the local SSIM map over the mask (arrays already checked, `mask` boolean).

    Parameters: `skimage.metrics.structural_similarity(full=True, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, K1=0.01, K2=0.03, data_range=data_range)` — an 11-voxel Gaussian window
    (truncate 3.5) with population covariances, as in Wang et al. (2004).

    Both images are set to 0 outside the mask first, so only in-brain values (and the brain's outline) count: a
    method's output outside the brain cannot change its score. The 5 voxels next to the array's edge are left out,
    as skimage does for its mean SSIM (its filters reflect there); with an all-true mask this equals skimage's own
    mean SSIM.
    """
    _, ssim_map = structural_similarity(
        np.where(mask, pred, 0),
        np.where(mask, target, 0),
        data_range=data_range,
        gaussian_weights=True,
        sigma=SSIM_SIGMA,
        use_sample_covariance=False,
        K1=SSIM_K1,
        K2=SSIM_K2,
        full=True,
    )
    interior = (slice(SSIM_PAD, -SSIM_PAD),) * mask.ndim
    inside = mask[interior]
    if not inside.any():
        raise DemistError(
            f"image_metrics: the mask lies entirely within {SSIM_PAD} voxels of the array's edge; "
            "expected brain voxels away from the border (pad the volume)"
        )
    return float(ssim_map[interior][inside].mean(dtype=np.float64))


def centred_psnr(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> float:
    """PSNR of `pred` minus its mean error against `target` (voxel arrays): the map without its level; `inf` when
    nothing but a level separates them."""
    centred = pred - np.mean(pred - target)
    if np.array_equal(centred, target):
        return float("inf")
    return float(peak_signal_noise_ratio(target, centred, data_range=data_range))


def image_metrics(
    pred: np.ndarray, target: np.ndarray, mask: np.ndarray, data_range: float = 1.0
) -> dict[str, float]:
    """PSNR, SSIM, MSE, L1 and NCC of `pred` against `target` inside the boolean `mask`.

    Inputs are 2D or 3D arrays of one shape, scaled to [0, 1] by a fixed physical range (for PSR: divide by
    `psr_range`); predictions are not clipped. Definitions, over the N voxels in the mask:

    - mse  = mean((pred − target)²)                    (`skimage.metrics.mean_squared_error` on the voxels)
    - psnr = 10·log10(data_range² / mse) in dB; `inf` when the prediction is exact
    - psnr_centred = the psnr of `pred` minus its mean error inside the mask: what is left once the session's level
      is taken out. A subject's overall PSR level is only partly visible in T1w/FLAIR, so on a few sessions the
      raw psnr ranks methods largely by how they guessed it (docs/predictability.md); this one ranks the map.
    - l1   = mean(|pred − target|)
    - ncc  = Pearson correlation of the voxels; NaN if either image is constant inside the mask
    - ssim = mean of the 3D SSIM map inside the mask (see `_masked_ssim` for the window and constants)

    Raises DemistError on mismatched shapes, an empty mask, non-finite values inside the mask or a volume smaller
    than the SSIM window.
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if not np.issubdtype(pred.dtype, np.floating):
        pred = pred.astype(np.float64)
    if not np.issubdtype(target.dtype, np.floating):
        target = target.astype(np.float64)
    mask = _check_inputs(pred, target, np.asarray(mask), data_range)
    p = pred[mask].astype(np.float64)
    t = target[mask].astype(np.float64)
    mse = float(mean_squared_error(t, p))
    psnr = float("inf") if mse == 0 else float(peak_signal_noise_ratio(t, p, data_range=data_range))
    psnr_centred = centred_psnr(p, t, data_range)
    return {
        "psnr": psnr,
        "psnr_centred": psnr_centred,
        "ssim": _masked_ssim(pred, target, mask, data_range),
        "mse": mse,
        "l1": float(np.mean(np.abs(p - t))),
        "ncc": _pearson(p, t),
    }
