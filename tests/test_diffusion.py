"""Noise schedule algebra and samplers: timestep lists, exactness with oracle models, cross-checks with MONAI and
diffusers, bf16 outputs, determinism."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from demist.diffusion import SAMPLERS, NoiseSchedule, sample_ddim, sample_ddpm, sample_dpmpp_2m, timesteps_for
from demist.errors import DemistError

BUNDLE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195}
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SHAPE = (2, 3, 4, 4, 4)  # (B, C, D, H, W) latents


def _latent(seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _batch_t(t: int, batch: int = SHAPE[0]) -> torch.Tensor:
    return torch.full((batch,), t, dtype=torch.long)


def _target_from_x0(schedule: NoiseSchedule, x0_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model output (ε, v or x0) that makes x0_hat the prediction at (x_t, t)."""
    signal, sigma = schedule.signal_and_noise_scales(t, x_t)
    eps_hat = (x_t - signal * x0_hat) / sigma
    return schedule.training_target(x0_hat, eps_hat, t)


def oracle(schedule: NoiseSchedule, x0: torch.Tensor):
    """A model that knows the answer: its prediction implies x0 exactly, whatever x_t is."""
    return lambda x_t, t: _target_from_x0(schedule, x0, x_t, t)


MU, SD = 0.3, 0.5  # data ~ N(MU, SD²) per element: the ideal denoiser and the probability-flow ODE are closed-form


def gaussian_denoiser(schedule: NoiseSchedule):
    """The exact model for Gaussian data: E[x0 | x_t] = MU + √ᾱ·SD²/(ᾱ·SD² + 1 − ᾱ) · (x_t − √ᾱ·MU)."""

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        signal, sigma = schedule.signal_and_noise_scales(t, x_t)
        x0_hat = MU + signal * SD**2 / (signal**2 * SD**2 + sigma**2) * (x_t - signal * MU)
        return _target_from_x0(schedule, x0_hat, x_t, t)

    return model


def test_betas_and_alphas_equal_monai_bundle_scheduler():
    schedule = NoiseSchedule.create(**BUNDLE)
    monai = DDPMScheduler(schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    assert torch.equal(schedule.betas, monai.betas)
    assert torch.equal(schedule.alphas_cumprod, monai.alphas_cumprod)
    assert schedule.alphas_cumprod.shape == (1000,) and schedule.alphas_cumprod[-1] < 2e-4
    assert torch.all(schedule.alphas_cumprod[1:] < schedule.alphas_cumprod[:-1])
    assert schedule.to_monai().clip_sample is False


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_noise_target_algebra_round_trips(prediction_type: str):
    schedule = NoiseSchedule.create(prediction_type=prediction_type)
    x0, noise = _latent(0, scale=3.0), _latent(1)
    t = torch.tensor([0, 999], dtype=torch.long)  # both ends of the schedule, one per sample
    x_t = schedule.add_noise(x0, noise, t)
    monai = DDPMScheduler(schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)
    torch.testing.assert_close(x_t, monai.add_noise(x0, noise, t))
    target = schedule.training_target(x0, noise, t)
    if prediction_type == "v_prediction":
        torch.testing.assert_close(target, monai.get_velocity(x0, noise, t))
    x0_hat, eps_hat = schedule.predict_x0_eps(target, x_t, t)
    torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=1e-4)  # ε-prediction divides by √ᾱ_999 ≈ 0.012
    torch.testing.assert_close(eps_hat, noise, atol=2e-4, rtol=1e-4)


def test_predict_x0_eps_is_float32_and_differentiable_under_bf16_outputs():
    schedule = NoiseSchedule.create(prediction_type="epsilon")
    x0, noise, t = _latent(2), _latent(3), torch.tensor([10, 500], dtype=torch.long)
    x_t = schedule.add_noise(x0, noise, t)
    output = noise.to(torch.bfloat16).requires_grad_(True)
    x0_hat, eps_hat = schedule.predict_x0_eps(output, x_t, t)
    assert x0_hat.dtype == eps_hat.dtype == torch.float32
    torch.testing.assert_close(x0_hat, x0, atol=0.05, rtol=0.0)  # bf16 keeps ~3 significant digits of ε
    x0_hat.abs().sum().backward()
    assert output.grad is not None and output.grad.abs().sum() > 0


def test_schedule_and_timestep_arguments_are_checked():
    with pytest.raises(DemistError, match="prediction_type"):
        NoiseSchedule.create(prediction_type="eps")
    with pytest.raises(DemistError, match="beta_start"):
        NoiseSchedule.create(beta_start=0.02, beta_end=0.01)
    schedule = NoiseSchedule.create()
    x = _latent(0)
    with pytest.raises(DemistError, match="LongTensor"):
        schedule.add_noise(x, x, torch.tensor([1.0, 2.0]))
    with pytest.raises(DemistError, match="LongTensor"):
        schedule.add_noise(x, x, torch.tensor([1], dtype=torch.long))
    with pytest.raises(DemistError, match="sampler"):
        timesteps_for("euler", schedule, 10)
    with pytest.raises(DemistError, match="steps"):
        timesteps_for("ddim", schedule, 1001)
    with pytest.raises(DemistError, match="steps"):
        timesteps_for("ddpm", schedule, 50)


def test_timestep_lists_start_at_999_decrease_strictly_and_match_monai():
    schedule = NoiseSchedule.create()
    assert timesteps_for("ddim", schedule, 10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert timesteps_for("ddpm", schedule, 1000) == list(range(999, -1, -1))
    assert timesteps_for("ddim", schedule, 1) == [999]
    for steps in (2, 7, 10, 20, 50, 333, 1000):
        listed = timesteps_for("dpm++", schedule, steps)
        assert listed == timesteps_for("ddim", schedule, steps)
        assert len(listed) == steps and listed[0] == 999 and listed[-1] == 0
        assert all(later < earlier for earlier, later in zip(listed, listed[1:]))
        monai = DDIMScheduler(schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)
        monai.set_timesteps(steps)
        assert monai.timesteps.tolist() == listed


def test_sampling_can_start_below_T_from_a_noised_latent():
    schedule = NoiseSchedule.create(prediction_type="sample")
    assert timesteps_for("ddim", schedule, 4, start=300) == timesteps_for("dpm++", schedule, 4, start=300) == [
        300, 200, 100, 0]
    assert timesteps_for("ddpm", schedule, 10, start=9) == list(range(9, -1, -1))
    for steps, start, message in [(5, 3, "expected an integer from 1 to 4"), (1, 1000, "start timestep: 1000"),
                                  (1, -1, "start timestep: -1")]:
        with pytest.raises(DemistError, match=message):
            timesteps_for("ddim", schedule, steps, start=start)
    x0 = _latent(8, scale=3.0)
    for name, steps in (("ddim", 3), ("dpm++", 3), ("ddpm", 51)):
        calls = []
        model = oracle(schedule, x0)

        def recording(x_t, t, model=model, calls=calls):
            calls.append(int(t[0]))
            return model(x_t, t)

        x_start = schedule.add_noise(x0 + 0.5, _latent(9), _batch_t(50))
        out = SAMPLERS[name](recording, x_start, schedule, steps, generator=torch.Generator().manual_seed(0), start=50)
        assert calls[0] == 50 and calls[-1] == 0 and len(calls) == steps, name
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_ddim_steps_to_the_listed_previous_timestep_where_monai_ddim_does_not():
    schedule = NoiseSchedule.create(prediction_type="epsilon")
    x0, noise = _latent(0), _latent(1)
    seen: list[tuple[int, torch.Tensor]] = []

    def recording_oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append((int(t[0]), x_t.clone()))
        return _target_from_x0(schedule, x0, x_t, t)

    x_T = schedule.add_noise(x0, noise, _batch_t(999))
    sample_ddim(recording_oracle, x_T, schedule, steps=10)
    assert [t for t, _ in seen] == timesteps_for("ddim", schedule, 10)
    for t, x_t in seen:  # an exact prediction keeps x_t on the forward path of (x0, noise) at the listed t
        torch.testing.assert_close(x_t, schedule.add_noise(x0, noise, _batch_t(t)), atol=1e-4, rtol=1e-4)

    # MONAI 1.6.1 lists the same timesteps, but its step() from 999 lands on ᾱ_899 (999 − 1000//10), not on ᾱ_888.
    monai = DDIMScheduler(schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    monai.set_timesteps(10)
    assert monai.timesteps[1].item() == 888
    monai_next, _ = monai.step(noise, 999, x_T)
    torch.testing.assert_close(monai_next, schedule.add_noise(x0, noise, _batch_t(899)), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(monai_next, seen[1][1], atol=1e-2)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_deterministic_samplers_return_x0_of_an_oracle_in_few_steps(name: str, prediction_type: str):
    schedule = NoiseSchedule.create(prediction_type=prediction_type)
    x0 = _latent(4, scale=3.0)  # outside [-1, 1]: any clipping of x̂0 would show
    out = SAMPLERS[name](oracle(schedule, x0), _latent(5), schedule, 4)
    assert out.dtype == torch.float32 and out.shape == SHAPE
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_ddpm_with_an_oracle_converges_to_x0_and_is_seeded():
    schedule = NoiseSchedule.create(prediction_type="v_prediction")
    x0 = _latent(6, scale=3.0)
    model = oracle(schedule, x0)
    first = sample_ddpm(model, _latent(7), schedule, 1000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, x0, atol=1e-4, rtol=1e-4)
    # the per-step noise comes from the generator: same seed, same path; another seed, another path
    gaussian = gaussian_denoiser(schedule)
    runs = [
        sample_ddpm(gaussian, _latent(7), schedule, 1000, generator=torch.Generator().manual_seed(seed))
        for seed in (3, 3, 4)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_ddpm_samples_the_data_distribution():
    schedule = NoiseSchedule.create(prediction_type="epsilon")
    x_T = torch.randn(4, 1, 16, 16, 16, generator=torch.Generator().manual_seed(8))
    samples = sample_ddpm(gaussian_denoiser(schedule), x_T, schedule, 1000, generator=torch.Generator().manual_seed(9))
    assert abs(samples.mean().item() - MU) < 0.03
    assert abs(samples.std().item() - SD) < 0.03


def _gaussian_ode_reference(schedule: NoiseSchedule, x_T: torch.Tensor) -> torch.Tensor:
    """Exact probability-flow ODE from (x_T, t=T−1) to t=0, then the final jump to x̂0 that every sampler makes."""
    # the flow of a Gaussian keeps each element's z-score under p_t = N(√ᾱ·MU, ᾱ·SD² + 1 − ᾱ)
    mean = lambda alpha_bar: alpha_bar.sqrt() * MU  # noqa: E731
    std = lambda alpha_bar: (alpha_bar * SD**2 + 1 - alpha_bar).sqrt()  # noqa: E731
    first, last = schedule.alphas_cumprod[-1], schedule.alphas_cumprod[0]
    x_0 = mean(last) + std(last) * (x_T - mean(first)) / std(first)
    return schedule.predict_x0_eps(gaussian_denoiser(schedule)(x_0, _batch_t(0)), x_0, _batch_t(0))[0]


def test_ddim_with_all_training_steps_matches_monai_ddim_and_the_exact_ode():
    schedule = NoiseSchedule.create(prediction_type="epsilon")
    model, x_T = gaussian_denoiser(schedule), _latent(10)
    ours = sample_ddim(model, x_T, schedule, 1000)
    monai = DDIMScheduler(schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    monai.set_timesteps(1000)  # stride 1: MONAI's previous timestep is right
    x = x_T.clone()
    for t in monai.timesteps.tolist():
        x, _ = monai.step(model(x, _batch_t(t)), t, x)
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)
    assert (ours - _gaussian_ode_reference(schedule, x_T)).abs().max() < 0.02


def test_ddim_equals_first_order_dpm_solver_from_diffusers():
    diffusers = pytest.importorskip("diffusers")
    schedule = NoiseSchedule.create(prediction_type="v_prediction")
    model, x_T = gaussian_denoiser(schedule), _latent(11)
    solver = diffusers.DPMSolverMultistepScheduler(
        trained_betas=schedule.betas.numpy(), prediction_type="v_prediction", solver_order=1, final_sigmas_type="zero"
    )
    listed = timesteps_for("ddim", schedule, 7)
    solver.set_timesteps(timesteps=listed)
    x = x_T.clone()
    for t in listed:  # DPM-Solver++ of order 1 is DDIM (η = 0)
        x = solver.step(model(x, _batch_t(t)), t, x, return_dict=False)[0]
    torch.testing.assert_close(sample_ddim(model, x_T, schedule, 7), x, atol=1e-4, rtol=1e-4)


def _reference_dpmpp_2m(model, x_T: torch.Tensor, schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """DPM-Solver++(2M) in log-SNR form (Lu et al. 2022), written independently of diffusers for the cross-check."""
    listed = timesteps_for("dpm++", schedule, steps)
    alpha_bar = schedule.alphas_cumprod.double()
    lam = lambda t: 0.5 * torch.log(alpha_bar[t] / (1 - alpha_bar[t]))  # noqa: E731
    x, previous_x0, previous_h = x_T.double(), None, None
    for i, t in enumerate(listed):
        x0_hat = schedule.predict_x0_eps(model(x.float(), _batch_t(t)), x.float(), _batch_t(t))[0].double()
        if i == len(listed) - 1:
            return x0_hat.float()  # the last step goes to ᾱ = 1
        t_next = listed[i + 1]
        h = lam(t_next) - lam(t)
        blended = x0_hat if previous_x0 is None else x0_hat + (x0_hat - previous_x0) * h / (2 * previous_h)
        sigma_ratio = ((1 - alpha_bar[t_next]) / (1 - alpha_bar[t])).sqrt()
        x = sigma_ratio * x - alpha_bar[t_next].sqrt() * torch.expm1(-h) * blended
        previous_x0, previous_h = x0_hat, h
    raise AssertionError("unreachable")


def test_dpmpp_2m_matches_an_independent_implementation_and_beats_ddim_on_gaussian_data():
    schedule = NoiseSchedule.create(prediction_type="epsilon")
    model, x_T = gaussian_denoiser(schedule), _latent(12)
    ours = sample_dpmpp_2m(model, x_T, schedule, 8)
    torch.testing.assert_close(ours, _reference_dpmpp_2m(model, x_T, schedule, 8), atol=1e-4, rtol=1e-4)
    exact = _gaussian_ode_reference(schedule, x_T)
    for steps in (5, 10):
        ddim_error = (sample_ddim(model, x_T, schedule, steps) - exact).abs().max()
        dpm_error = (sample_dpmpp_2m(model, x_T, schedule, steps) - exact).abs().max()
        assert dpm_error < 0.7 * ddim_error


@pytest.mark.parametrize("name", ["ddim", "dpm++", "ddpm"])
def test_bf16_model_outputs_give_float32_samples_close_to_float32_ones(name: str):
    schedule = NoiseSchedule.create(prediction_type="sample")
    model = gaussian_denoiser(schedule)
    steps = 1000 if name == "ddpm" else 10

    def run(model_fn) -> torch.Tensor:
        return SAMPLERS[name](model_fn, _latent(13), schedule, steps, generator=torch.Generator().manual_seed(0))

    full = run(model)
    half = run(lambda x_t, t: model(x_t, t).to(torch.bfloat16))
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half, full, atol=0.03, rtol=0.0)


def test_samplers_are_pure_and_show_progress(capsys: pytest.CaptureFixture[str]):
    schedule = NoiseSchedule.create(prediction_type="epsilon")
    model, x_T = gaussian_denoiser(schedule), _latent(14)
    before = x_T.clone()
    first = sample_dpmpp_2m(model, x_T, schedule, 6, progress=True)
    assert "dpm++" in capsys.readouterr().err
    assert torch.equal(sample_dpmpp_2m(model, x_T, schedule, 6), first)
    assert torch.equal(x_T, before)
    with pytest.raises(DemistError, match="model output"):
        sample_ddim(lambda x_t, t: x_t[:, :1], x_T, schedule, 3)
