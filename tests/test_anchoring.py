"""Low-frequency anchoring keeps every x̂0's coarse part at its trajectory's first estimate, in any prediction type."""

from __future__ import annotations

import pytest
import torch

from demist.diffusion.anchoring import anchored, lowpass
from demist.diffusion.schedule import NoiseSchedule


def drifting_model(schedule: NoiseSchedule, base: torch.Tensor):
    """A network whose x̂0 is `base` plus a level that drifts with t (as a DEMIST sample's does), in its own type."""
    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = base + 0.3 * (1.0 - t.float().reshape(-1, 1, 1, 1, 1) / 1000.0)
        signal, noise = schedule.signal_and_noise_scales(t, x_t)
        return schedule.training_target(x0, (x_t - signal * x0) / noise, t)
    return model


def test_lowpass_passes_a_constant_field_unchanged():
    x = torch.full((1, 2, 6, 7, 5), 0.7)
    torch.testing.assert_close(lowpass(x, 2.0), x)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_the_level_stays_at_the_first_estimate_along_a_trajectory(prediction_type):
    schedule = NoiseSchedule.create(prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1, 3, 8, 8, 8, generator=generator)
    model = drifting_model(schedule, base)
    model_anchored = anchored(model, schedule, sigma=2.0)
    first = None
    for step in (999, 700, 300, 0):
        t = torch.tensor([step])
        x_t = torch.randn(base.shape, generator=generator)
        x0, _ = schedule.predict_x0_eps(model_anchored(x_t, t), x_t, t)
        plain, _ = schedule.predict_x0_eps(model(x_t, t), x_t, t)
        if first is None:
            first = x0
            torch.testing.assert_close(x0, plain, rtol=0, atol=1e-4)  # the first call is the network's own
        else:  # the drift (a constant) is gone; everything else of the call's x̂0 is kept
            torch.testing.assert_close(x0, first, rtol=0, atol=1e-4)
            assert (plain - x0).abs().mean() > 0.05


def test_each_call_keeps_its_own_detail_and_takes_the_first_call_s_low_pass():
    """Fine detail that changes from call to call survives anchoring; only the low-pass is the first call's."""
    schedule = NoiseSchedule.create(prediction_type="sample")
    generator = torch.Generator().manual_seed(1)
    smooth = lowpass(torch.randn(1, 2, 12, 12, 12, generator=generator), 3.0)
    checker = (torch.arange(12)[:, None, None] + torch.arange(12)[None, :, None] + torch.arange(12)[None, None, :]) % 2
    estimates = {999: smooth, 500: smooth + 0.2 + 0.1 * checker.float(), 100: 0.5 * smooth - 0.1 * checker.float()}
    model = anchored(lambda x_t, t: estimates[int(t)].clone(), schedule, sigma=1.5)
    x = torch.zeros_like(smooth)
    first = model(x, torch.tensor([999]))
    torch.testing.assert_close(first, smooth)
    for step in (500, 100):
        out = model(x, torch.tensor([step]))
        own = estimates[step]
        torch.testing.assert_close(out, own - lowpass(own, 1.5) + lowpass(first, 1.5), rtol=0, atol=1e-5)
        assert (out - first).abs().max() > 0.05  # the call's own detail is there, not the first estimate whole


def test_a_new_trajectory_takes_a_new_anchor():
    schedule = NoiseSchedule.create(prediction_type="sample")
    levels = iter([0.0, 0.5, 1.0])
    model = anchored(lambda x_t, t: torch.full_like(x_t, next(levels)), schedule, sigma=1.0)
    x = torch.zeros(1, 1, 4, 4, 4)
    assert float(model(x, torch.tensor([999])).mean()) == pytest.approx(0.0)
    assert float(model(x, torch.tensor([500])).mean()) == pytest.approx(0.0, abs=1e-6)  # anchored to the first
    assert float(model(x, torch.tensor([999])).mean()) == pytest.approx(1.0)  # back at T: a new sample
