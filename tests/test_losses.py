"""Loss terms: Sobel edges, KL in closed form, masked reconstruction, latent alignment."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence as torch_kl

from demist.training.losses import (alignment_loss, edge_loss, kl_divergence, reconstruction_loss,
                                    sobel_gradient_magnitude, voxel_weights)


def smooth_volume(seed: int = 0, shape=(2, 1, 12, 14, 10)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=generator)
    return torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1)


def test_sobel_magnitude_of_a_ramp_is_its_slope_inside() -> None:
    i = torch.arange(10, dtype=torch.float32)
    ramp = (2.5 * i)[None, None, :, None, None].expand(1, 1, 10, 8, 9).contiguous()
    magnitude = sobel_gradient_magnitude(ramp)
    assert magnitude.shape == ramp.shape
    torch.testing.assert_close(magnitude[..., 1:-1, :, :], torch.full_like(magnitude[..., 1:-1, :, :], 2.5))
    diagonal = (i[:, None, None] + 2 * i[None, :, None] - i[None, None, :])[None, None]  # slope (1, 2, -1)
    inner = sobel_gradient_magnitude(diagonal)[..., 1:-1, 1:-1, 1:-1]
    torch.testing.assert_close(inner, torch.full_like(inner, 6.0**0.5))


def test_sobel_magnitude_is_zero_on_a_constant_and_differentiable_there() -> None:
    x = torch.full((1, 2, 6, 6, 6), 0.3, requires_grad=True)
    magnitude = sobel_gradient_magnitude(x)
    assert float(magnitude.detach().max()) < 1e-5
    magnitude.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_edge_loss_zero_for_identical_positive_for_shifted() -> None:
    x = smooth_volume()
    assert float(edge_loss(x, x.clone())) == pytest.approx(0.0, abs=1e-7)
    shifted = torch.roll(x, shifts=2, dims=2)
    assert float(edge_loss(shifted, x)) > 1e-3
    # An intensity offset leaves every gradient unchanged.
    assert float(edge_loss(x + 0.5, x)) == pytest.approx(0.0, abs=1e-6)


def test_edge_loss_mask_ignores_background() -> None:
    x = smooth_volume()
    y = x.clone()
    y[..., :4, :, :] += torch.rand_like(y[..., :4, :, :])  # differences only in the first slab
    brain = torch.zeros_like(x)
    brain[..., 7:, :, :] = 1  # far enough that the 3-voxel Sobel support never reaches the slab
    assert float(edge_loss(y, x, voxel_weights(brain, 0.0))) == pytest.approx(0.0, abs=1e-7)
    assert float(edge_loss(y, x, voxel_weights(brain, 0.1))) > 0


def test_kl_matches_the_closed_form_of_torch_distributions() -> None:
    generator = torch.Generator().manual_seed(1)
    mu = torch.randn(3, 8, 2, 3, 2, generator=generator)
    sigma = torch.rand(3, 8, 2, 3, 2, generator=generator) + 0.2
    expected = torch_kl(Normal(mu, sigma), Normal(0.0, 1.0)).flatten(1).sum(dim=1).mean()
    torch.testing.assert_close(kl_divergence(mu, sigma), expected)
    assert float(kl_divergence(torch.zeros(2, 8, 2, 2, 2), torch.ones(2, 8, 2, 2, 2))) == 0.0


def test_reconstruction_loss_terms_and_weights() -> None:
    target = torch.zeros(1, 1, 2, 2, 2)
    pred = torch.zeros_like(target)
    pred[..., 0, 0, 0] = 0.5  # one wrong voxel
    brain = torch.ones_like(target)
    assert float(reconstruction_loss(pred, target, None, 1.0, 0.0)) == pytest.approx(0.5 / 8)
    assert float(reconstruction_loss(pred, target, None, 0.0, 1.0)) == pytest.approx(0.25 / 8)
    assert float(reconstruction_loss(pred, target, None, 1.0, 2.0)) == pytest.approx(0.5 / 8 + 0.5 / 8)
    brain[..., 0, 0, 0] = 0  # the wrong voxel is background: with weight 0.1 it counts a tenth
    weighted = float(reconstruction_loss(pred, target, voxel_weights(brain, 0.1), 1.0, 0.0))
    assert weighted == pytest.approx(0.1 * 0.5 / 7.1)


def test_alignment_loss_trains_only_the_condition_side() -> None:
    mu_cond = torch.randn(2, 8, 2, 2, 2, requires_grad=True)
    mu_psr = torch.randn(2, 8, 2, 2, 2, requires_grad=True)
    loss = alignment_loss(mu_cond, mu_psr)
    torch.testing.assert_close(loss, ((mu_cond - mu_psr) ** 2).mean())
    loss.backward()
    assert mu_cond.grad is not None and mu_psr.grad is None
    assert float(alignment_loss(mu_psr.detach(), mu_psr.detach())) == 0.0


def test_losses_compute_in_float32_under_bf16_inputs() -> None:
    x = smooth_volume().to(torch.bfloat16)
    assert edge_loss(x, x.float()).dtype == torch.float32
    assert reconstruction_loss(x, x.float() + 0.1).dtype == torch.float32
