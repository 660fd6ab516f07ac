"""What the scanner and the qMT fit add: bias fields, Rician noise, thick FLAIR slices, and a PSR map that is
slightly blurred, noisy, smoothly biased by the fit's residual B1 error and a little misregistered against the
structural images (as after real co-registration)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from demist.data.phantom.deformation import FIELD_OF_VIEW_MM, OutputGrid, sample_lattice, smooth_random_field

#: Bias fields: smooth over this scale (mm), drawn on a lattice of this cell size (mm).
BIAS_SMOOTHNESS_MM, BIAS_CELL_MM = 60.0, 8.0


@dataclass(frozen=True)
class AcquisitionParameters:
    """One session's acquisition: SNRs relative to WM, bias amplitudes, FLAIR slice thickness, PSR noise."""

    t1w_snr: float
    flair_snr: float
    t1w_bias: float  # peak fractional amplitude of the bias field inside the brain
    flair_bias: float
    flair_slice_mm: float
    psr_noise: float  # PSR units
    psr_bias: float  # peak fractional PSR error from the fit's residual B1 inhomogeneity (smooth, session-specific)
    psr_blur_mm: float  # Gaussian sigma of the PSR map's own resolution
    psr_shift_mm: tuple[float, float, float]  # residual misregistration of PSR vs T1w/FLAIR
    t1w_gain: float  # arbitrary scanner scaling
    flair_gain: float

    def as_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else [round(x, 5) for x in v])
                for k, v in self.__dict__.items()}


def draw_acquisition(rng: np.random.Generator, flair_slice_mm: float) -> AcquisitionParameters:
    shift = rng.standard_normal(3)
    shift *= rng.uniform(0.0, 0.5) / np.linalg.norm(shift)
    return AcquisitionParameters(
        t1w_snr=float(rng.uniform(20, 40)), flair_snr=float(rng.uniform(12, 25)),
        t1w_bias=float(rng.uniform(0.04, 0.12)), flair_bias=float(rng.uniform(0.04, 0.12)),
        flair_slice_mm=flair_slice_mm, psr_noise=float(rng.uniform(0.005, 0.007)),
        psr_bias=float(rng.uniform(0.02, 0.05)), psr_blur_mm=0.6,
        psr_shift_mm=tuple(float(s) for s in shift), t1w_gain=float(rng.uniform(600, 1400)),
        flair_gain=float(rng.uniform(600, 1400)),
    )


def bias_field(rng: np.random.Generator, grid: OutputGrid, world: np.ndarray, peak: float) -> np.ndarray:
    """A smooth multiplicative field at world points (3, n): 1 ± `peak` at its extremes over those points.

    Drawn on a lattice fixed in the scanner around the grid's centre, so it does not depend on the voxel size.
    """
    cells = np.ceil((np.array(FIELD_OF_VIEW_MM) + 64.0) / BIAS_CELL_MM).astype(int)
    field = smooth_random_field(rng, tuple(cells), BIAS_SMOOTHNESS_MM / BIAS_CELL_MM)
    centre = grid.world(((np.array(grid.shape) - 1) / 2.0)[:, None])[:, 0]
    values = sample_lattice(field, centre - (cells - 1) / 2.0 * BIAS_CELL_MM, BIAS_CELL_MM, world)[0]
    values -= values.mean()
    return (1.0 + peak * values / np.abs(values).max()).astype(np.float32)


def rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise of standard deviation `sigma` per channel."""
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)


def thick_slices(volume: np.ndarray, spacing: float, slice_mm: float) -> np.ndarray:
    """Blur along z as a `slice_mm` slice profile would (a Gaussian of the box's extra variance)."""
    extra_variance = (slice_mm**2 - spacing**2) / 12.0
    if extra_variance <= 1e-6:
        return volume
    return ndi.gaussian_filter1d(volume, np.sqrt(extra_variance) / spacing, axis=2, mode="constant")


def psr_resolution(volume: np.ndarray, spacing: float, blur_mm: float,
                   shift_mm: tuple[float, float, float]) -> np.ndarray:
    """The PSR map at its own resolution, slightly misplaced: Gaussian blur, then a sub-voxel shift."""
    blurred = ndi.gaussian_filter(volume, blur_mm / spacing, mode="constant")
    return ndi.shift(blurred, np.asarray(shift_mm) / spacing, order=1, mode="constant")
