"""Loss terms shared by the training stages: masked reconstruction, KL, Sobel-edge, latent alignment.

Every function takes (B, C, D, H, W) tensors and returns a scalar. They compute in float32 whatever the autocast
precision of the network that produced their inputs, so bf16 training does not quantise the loss itself.
"""

from __future__ import annotations

import torch
from monai.networks.layers import separable_filtering

# Sobel derivative and smoothing kernels, normalised as in `monai.transforms.SobelGradients` so that the response to
# a unit-slope ramp is 1 per voxel. (That transform handles one unbatched image; the loss needs batches and
# gradients, so it applies the same kernels with MONAI's `separable_filtering`.)
_SOBEL_DIFF = (-0.5, 0.0, 0.5)
_SOBEL_SMOOTH = (0.25, 0.5, 0.25)
_MAGNITUDE_EPS = 1e-12  # keeps sqrt differentiable where the gradient vanishes


def sobel_gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """3D Sobel gradient magnitude of each channel, same shape as `x` (replicate padding at the borders)."""
    if x.ndim != 5:
        raise ValueError(f"sobel_gradient_magnitude expects (B, C, D, H, W); got shape {tuple(x.shape)}")
    x = x.float()
    diff = torch.tensor(_SOBEL_DIFF, dtype=x.dtype, device=x.device)
    smooth = torch.tensor(_SOBEL_SMOOTH, dtype=x.dtype, device=x.device)
    squared = torch.zeros_like(x)
    with torch.autocast(x.device.type, enabled=False):  # autocast would run the filters in bf16
        for axis in range(3):
            kernels = [diff if a == axis else smooth for a in range(3)]
            squared = squared + separable_filtering(x, kernels, mode="replicate") ** 2
    return torch.sqrt(squared + _MAGNITUDE_EPS)


def voxel_weights(brain: torch.Tensor, background_weight: float) -> torch.Tensor:
    """1 inside the brain mask, `background_weight` outside (the mask as a float tensor of 0/1)."""
    brain = brain.float()
    return brain + background_weight * (1.0 - brain)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Weighted mean over all elements; `weights` broadcast over the channels of `values`."""
    values = values.float()
    if weights is None:
        return values.mean()
    weights = weights.expand_as(values)
    return (values * weights).sum() / weights.sum().clamp_min(1e-8)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                        l1_weight: float = 1.0, l2_weight: float = 0.0) -> torch.Tensor:
    """l1_weight·mean|pred − target| + l2_weight·mean(pred − target)², both weighted voxelwise."""
    error = pred.float() - target.float()
    loss = l1_weight * weighted_mean(error.abs(), weights)
    if l2_weight:
        loss = loss + l2_weight * weighted_mean(error**2, weights)
    return loss


def edge_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """‖∇pred − ∇target‖₁: mean absolute difference of the Sobel gradient magnitudes (0 for identical inputs)."""
    return weighted_mean((sobel_gradient_magnitude(pred) - sobel_gradient_magnitude(target)).abs(), weights)


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) ‖ N(0, 1)), summed over the latent elements of each sample, averaged over the batch."""
    mu, sigma = mu.float(), sigma.float()
    per_element = 0.5 * (mu**2 + sigma**2 - 2.0 * torch.log(sigma) - 1.0)
    return per_element.flatten(1).sum(dim=1).mean()


def alignment_loss(mu_cond: torch.Tensor, mu_psr: torch.Tensor) -> torch.Tensor:
    """‖μ_c − μ_y‖²: mean squared difference of the two latent means (the PSR side carries no gradient)."""
    return ((mu_cond.float() - mu_psr.detach().float()) ** 2).mean()
