"""Image metrics inside the brain."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from demist.errors import DemistError
from demist.evaluation.metrics import METRICS, image_metrics


@pytest.fixture
def volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A smooth target in [0, 1], a noisy prediction and an ellipsoidal 'brain' mask away from the edges."""
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, 28)] * 3, indexing="ij")
    target = (0.5 + 0.3 * np.sin(3 * x) * np.cos(2 * y) + 0.1 * z).astype(np.float32)
    pred = np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1).astype(np.float32)
    mask = (x / 0.7) ** 2 + (y / 0.6) ** 2 + (z / 0.5) ** 2 <= 1
    return pred, target, mask


def skimage_ssim(pred: np.ndarray, target: np.ndarray) -> float:
    return structural_similarity(
        pred, target, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )


def test_all_true_mask_matches_skimage(volumes):
    pred, target, _ = volumes
    result = image_metrics(pred, target, np.ones(target.shape, bool))
    assert set(result) == set(METRICS)
    assert result["psnr"] == pytest.approx(peak_signal_noise_ratio(target, pred, data_range=1.0), rel=1e-6)
    assert result["mse"] == pytest.approx(mean_squared_error(target, pred), rel=1e-6)
    assert result["ssim"] == pytest.approx(skimage_ssim(pred, target), abs=1e-6)
    assert result["l1"] == pytest.approx(np.mean(np.abs(pred.astype(float) - target)), rel=1e-6)
    assert result["ncc"] == pytest.approx(np.corrcoef(pred.ravel(), target.ravel())[0, 1], rel=1e-6)


def test_masked_metrics_use_only_brain_voxels(volumes):
    pred, target, mask = volumes
    result = image_metrics(pred, target, mask)
    p, t = pred[mask], target[mask]
    assert result["psnr"] == pytest.approx(peak_signal_noise_ratio(t, p, data_range=1.0), rel=1e-6)
    assert result["mse"] == pytest.approx(mean_squared_error(t, p), rel=1e-6)
    assert result["ncc"] == pytest.approx(np.corrcoef(p, t)[0, 1], rel=1e-6)
    # Nothing outside the brain can change any metric, SSIM included.
    garbage = np.where(mask, pred, np.float32(7.0))
    assert image_metrics(garbage, target, mask) == pytest.approx(result)
    # ...while a change inside the brain does.
    worse = image_metrics(np.where(mask, pred + 0.05, pred), target, mask)
    assert worse["psnr"] < result["psnr"] and worse["ssim"] < result["ssim"]


def test_centred_psnr_removes_the_level_and_nothing_else(volumes):
    pred, target, mask = volumes
    result = image_metrics(pred, target, mask)
    p, t = pred[mask].astype(np.float64), target[mask].astype(np.float64)
    assert result["psnr_centred"] == pytest.approx(
        peak_signal_noise_ratio(t, p - np.mean(p - t), data_range=1.0), rel=1e-6)
    assert result["psnr_centred"] >= result["psnr"]
    # A level added inside the brain lowers the raw PSNR and leaves the centred one where it was...
    shifted = image_metrics(np.where(mask, pred + 0.05, pred), target, mask)
    assert shifted["psnr"] < result["psnr"] - 2  # the noise SD is 0.05 too: the MSE about doubles
    assert shifted["psnr_centred"] == pytest.approx(result["psnr_centred"], rel=1e-5)
    # ...while a change of the map's shape lowers both.
    blurred = image_metrics(np.where(mask, 0.5 * pred + 0.25, pred), target, mask)
    assert blurred["psnr_centred"] < result["psnr_centred"]


def test_perfect_prediction(volumes):
    _, target, mask = volumes
    result = image_metrics(target, target, mask)
    assert result["psnr"] == math.inf and result["psnr_centred"] == math.inf
    assert result["mse"] == 0 and result["l1"] == 0
    assert result["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert result["ncc"] == pytest.approx(1.0, abs=1e-9)


def test_metrics_follow_the_data_range(volumes):
    pred, target, mask = volumes
    unit = image_metrics(pred, target, mask, data_range=1.0)
    scaled = image_metrics(pred * 0.25, target * 0.25, mask, data_range=0.25)
    for key in ("psnr", "ssim", "ncc"):
        assert scaled[key] == pytest.approx(unit[key], rel=1e-4)
    assert scaled["mse"] == pytest.approx(unit["mse"] * 0.0625, rel=1e-4)


def test_ssim_falls_with_noise(volumes):
    _, target, mask = volumes
    rng = np.random.default_rng(1)
    scores = [image_metrics(target + rng.normal(0, s, target.shape), target, mask)["ssim"] for s in (0.01, 0.05, 0.2)]
    assert scores[0] > scores[1] > scores[2]


def test_constant_images_give_nan_ncc(volumes):
    _, _, mask = volumes
    flat = np.full(mask.shape, 0.4)
    assert math.isnan(image_metrics(flat, flat + 0.1, mask)["ncc"])


@pytest.mark.parametrize(
    "case",
    ["shape", "mask_shape", "empty_mask", "nan_inside", "too_small", "bad_range"],
)
def test_bad_inputs_raise(volumes, case):
    pred, target, mask = volumes
    kwargs = {"pred": pred, "target": target, "mask": mask, "data_range": 1.0}
    if case == "shape":
        kwargs["pred"] = pred[:-1]
    elif case == "mask_shape":
        kwargs["mask"] = mask[:, :-1]
    elif case == "empty_mask":
        kwargs["mask"] = np.zeros_like(mask)
    elif case == "nan_inside":
        kwargs["pred"] = np.where(mask, np.nan, pred)
    elif case == "too_small":
        kwargs = {"pred": pred[:8, :8, :8], "target": target[:8, :8, :8], "mask": np.ones((8, 8, 8), bool)}
    elif case == "bad_range":
        kwargs["data_range"] = 0.0
    with pytest.raises(DemistError):
        image_metrics(**kwargs)


def test_nan_outside_the_mask_is_ignored(volumes):
    pred, target, mask = volumes
    result = image_metrics(np.where(mask, pred, np.nan), target, mask)
    assert np.isfinite(result["ssim"]) and result == pytest.approx(image_metrics(pred, target, mask))
