"""Noise schedule and samplers. Models never see noise: a sampler calls `model(x_t, t)` and does the rest."""

from __future__ import annotations

from demist.diffusion.samplers import SAMPLERS, sample_ddim, sample_ddpm, sample_dpmpp_2m, timesteps_for
from demist.diffusion.schedule import PREDICTION_TYPES, NoiseSchedule

__all__ = [
    "PREDICTION_TYPES",
    "SAMPLERS",
    "NoiseSchedule",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "timesteps_for",
]
