"""Low-frequency anchoring: a sampler option that keeps a sample's coarse structure at the network's first estimate.

Along its own trajectory a DEMIST sample drifts: each step moves the level of x̂0 a little, although from the true
latent noised to the same timesteps the network keeps it (docs/stage2_recipe.md, "With three times the training
subjects"). With `sampling.anchor_sigma` = σ > 0 (latent voxels), every x̂0 the sampler sees keeps its own detail
above a Gaussian low-pass of width σ and takes its low-pass from the x̂0 of the trajectory's first step, which at
t = T is the network's estimate of the conditional mean. ILVR (Choi et al. 2021) conditions a sampler the same way on
a reference image; here the reference is the network's own estimate, so nothing but DEMIST enters the sample. σ = 0
is the paper's sampler.
"""

from __future__ import annotations

import torch
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d

from demist.diffusion.samplers import Model
from demist.diffusion.schedule import NoiseSchedule


def lowpass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian low-pass of (B, C, D, H, W) with `sigma` voxels along each axis; edges replicated, so a constant
    field passes unchanged."""
    kernel = gaussian_1d(torch.tensor(float(sigma)), truncated=4.0, normalize=True).to(x.device, x.dtype)
    return separable_filtering(x, [kernel] * (x.ndim - 2), mode="replicate")


def anchored(model: Model, schedule: NoiseSchedule, sigma: float) -> Model:
    """`model` (x_t, t) -> its prediction, with each x̂0's low-pass replaced by that of its trajectory's first x̂0;
    the output is in the model's prediction type. A call at a timestep not below the previous call's starts a new
    trajectory (samplers step down in t), so every sample of a session is anchored to its own first estimate."""
    anchor: torch.Tensor | None = None
    last_step = -1

    def anchored_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal anchor, last_step
        x0, _ = schedule.predict_x0_eps(model(x_t, t), x_t, t)
        step, low = int(t.max()), lowpass(x0, sigma)
        if anchor is None or step >= last_step:
            anchor = low
        last_step = step
        x0 = x0 - low + anchor
        signal, noise = schedule.signal_and_noise_scales(t, x_t)
        return schedule.training_target(x0, (x_t.float() - signal * x0) / noise, t)

    return anchored_model
