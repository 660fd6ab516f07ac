"""The discrete-time noise schedule (variance-preserving) and the algebra between x0, ε, v and x_t.

Forward process: x_t = √ᾱ_t · x0 + √(1−ᾱ_t) · ε. The network predicts ε ("epsilon"),
v = √ᾱ_t · ε − √(1−ᾱ_t) · x0 ("v_prediction") or x0 itself ("sample"). Betas come from MONAI's scheduler, so they
equal those the MONAI bundle was trained with, bit for bit. Arithmetic is float32 whatever the dtype of the model
output (bf16 under autocast), and the ᾱ table follows the tensors to their device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.schedulers import DDPMScheduler

from demist.config_sections import DiffusionConfig
from demist.errors import DemistError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")


def monai_ddpm_scheduler(
    num_train_timesteps: int,
    beta_schedule: str,
    beta_start: float,
    beta_end: float,
    prediction_type: str,
) -> DDPMScheduler:
    """MONAI's DDPM scheduler for this schedule, with `clip_sample=False` (MONAI's default clips latents to [-1, 1])."""
    beta_args = {} if beta_schedule == "cosine" else {"beta_start": beta_start, "beta_end": beta_end}
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=False,
        **beta_args,
    )


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A noise schedule and the quantity the network predicts. Build it with `NoiseSchedule.create`."""

    num_train_timesteps: int
    beta_schedule: str
    beta_start: float
    beta_end: float
    prediction_type: str
    betas: torch.Tensor  # (T,) float32 on CPU, exactly MONAI's
    alphas_cumprod: torch.Tensor  # (T,) float32 on CPU: ᾱ_t = ∏_{s≤t} (1 − β_s)

    @classmethod
    def from_config(cls, diffusion: DiffusionConfig, prediction_type: str | None = None) -> NoiseSchedule:
        """The schedule of a config's [diffusion] section, predicting `prediction_type` (default: the config's)."""
        return cls.create(num_train_timesteps=diffusion.num_train_timesteps, beta_schedule=diffusion.beta_schedule,
                          beta_start=diffusion.beta_start, beta_end=diffusion.beta_end,
                          prediction_type=prediction_type or diffusion.prediction_type)

    @classmethod
    def create(
        cls,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "scaled_linear_beta",
        beta_start: float = 0.0015,
        beta_end: float = 0.0195,
        prediction_type: str = "epsilon",
    ) -> NoiseSchedule:
        """The schedule with these settings (defaults: the MONAI brain-MRI LDM bundle's)."""
        if prediction_type not in PREDICTION_TYPES:
            raise DemistError(
                f"prediction_type: {prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}"
            )
        if beta_schedule not in BETA_SCHEDULES:
            raise DemistError(f"beta_schedule: {beta_schedule!r} is not supported; expected one of {BETA_SCHEDULES}")
        if not isinstance(num_train_timesteps, int) or isinstance(num_train_timesteps, bool) or num_train_timesteps < 2:
            raise DemistError(f"num_train_timesteps: {num_train_timesteps!r}; expected an integer >= 2")
        if beta_schedule != "cosine" and not 0.0 < beta_start < beta_end < 1.0:
            raise DemistError(f"beta_start, beta_end: {beta_start}, {beta_end}; expected 0 < beta_start < beta_end < 1")
        monai = monai_ddpm_scheduler(num_train_timesteps, beta_schedule, beta_start, beta_end, prediction_type)
        return cls(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_start=float(beta_start),
            beta_end=float(beta_end),
            prediction_type=prediction_type,
            betas=monai.betas.detach().to(torch.float32).clone(),
            alphas_cumprod=monai.alphas_cumprod.detach().to(torch.float32).clone(),
        )

    def to_monai(self) -> DDPMScheduler:
        """A fresh MONAI DDPM scheduler with this schedule and prediction type (and `clip_sample=False`)."""
        return monai_ddpm_scheduler(
            self.num_train_timesteps, self.beta_schedule, self.beta_start, self.beta_end, self.prediction_type
        )

    def signal_and_noise_scales(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1−ᾱ_t)) as float32 on `like`'s device, shaped (B, 1, ..., 1) to broadcast against `like`."""
        self._check_timesteps(t, like)
        alpha_bar = self.alphas_cumprod.to(like.device)[t.to(like.device)]
        alpha_bar = alpha_bar.reshape(-1, *([1] * (like.ndim - 1)))
        return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t · x0 + √(1−ᾱ_t) · ε, in float32."""
        signal, sigma = self.signal_and_noise_scales(t, x0)
        return signal * x0.float() + sigma * noise.float()

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network must output at x_t = add_noise(x0, noise, t): ε, v or x0 per `prediction_type`."""
        if self.prediction_type == "epsilon":
            return noise.float()
        if self.prediction_type == "sample":
            return x0.float()
        signal, sigma = self.signal_and_noise_scales(t, x0)
        return signal * noise.float() - sigma * x0.float()

    def predict_x0_eps(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̂) implied by the network output at (x_t, t); float32, differentiable (the edge loss uses x̂0)."""
        output, x_t = model_output.float(), x_t.float()
        signal, sigma = self.signal_and_noise_scales(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - sigma * output) / signal, output
        if self.prediction_type == "v_prediction":
            return signal * x_t - sigma * output, signal * output + sigma * x_t
        return output, (x_t - signal * output) / sigma

    def _check_timesteps(self, t: torch.Tensor, like: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.dtype != torch.long or t.ndim != 1 or t.shape[0] != like.shape[0]:
            got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise DemistError(f"t: {got}; expected a LongTensor of shape ({like.shape[0]},), one timestep per sample")
