"""Samplers as pure functions with one signature:
`sample_<name>(model, x_T, schedule, steps, generator, progress, start, record)`.

`model(x_t, t)` returns the schedule's prediction type (ε, v or x0) for a batch x_t and a LongTensor t of shape (B,);
the caller closes over any conditioning. `x_T` is the latent at timestep `start` (default T−1: pure noise). Each call
builds its own scheduler state, so samplers share nothing. `record(t, x_t)`, when given, sees the latent at every
timestep before the model is called there (distillation reads the teacher's trajectory through it).
Model outputs are cast to float32 before every update; the result is float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from demist.diffusion.schedule import NoiseSchedule
from demist.errors import DemistError

logger = logging.getLogger(__name__)

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Recorder = Callable[[int, torch.Tensor], None]


def check_sampler(name: str, what: str = "--sampler") -> None:
    """Refuse a sampler name that is not one of SAMPLERS; `what` says where the name came from."""
    if name not in SAMPLERS:
        raise DemistError(f"{what} {name}: unknown; expected one of {', '.join(sorted(SAMPLERS))}")


def timesteps_for(name: str, schedule: NoiseSchedule, steps: int, start: int | None = None) -> list[int]:
    """The exact, strictly decreasing integer timesteps at which sampler `name` calls the model.

    `start` is the first timestep (default T−1, where x_T is pure noise; lower: x_T is a noised latent, SDEdit).
    "ddpm" visits every training timestep start, …, 0. "ddim" and "dpm++" use `steps` timesteps evenly spaced from
    start down to 0 (round(linspace(start, 0, N)), MONAI's list: T=1000, N=10 gives 999, 888, …, 111, 0); after the
    last one they step to ᾱ = 1, i.e. to x0.
    """
    total = schedule.num_train_timesteps
    check_sampler(name, "sampler")
    start = total - 1 if start is None else start
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < total:
        raise DemistError(f"start timestep: {start!r}; expected an integer from 0 to {total - 1}")
    if name == "ddpm":
        if steps != start + 1:
            raise DemistError(f"steps: ddpm runs every training timestep from {start}, got {steps}; expected "
                              f"{start + 1} (or use 'ddim' / 'dpm++')")
        return list(range(start, -1, -1))
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= start + 1:
        raise DemistError(f"steps: {steps!r}; expected an integer from 1 to {start + 1} (the timesteps from "
                          f"{start} down to 0)")
    return torch.linspace(start, 0, steps, dtype=torch.float32).round().long().tolist()


def _call_model(model: Model, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """Run the model at integer timestep t for the whole batch; the output is cast to float32."""
    t_batch = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
    output = model(x_t, t_batch)
    if output.shape != x_t.shape:
        raise DemistError(f"model output: shape {tuple(output.shape)}; expected the shape of x_t, {tuple(x_t.shape)}")
    return output.float()


def _record(record: Recorder | None, t: int, x: torch.Tensor) -> None:
    if record is not None:
        record(t, x)


def _progress(timesteps: list[int], name: str, progress: bool) -> tqdm:
    return tqdm(timesteps, desc=f"sampling ({name}, {len(timesteps)} steps)", disable=not progress, leave=False)


@torch.no_grad()
def sample_ddpm(
    model: Model,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    steps: int,
    generator: torch.Generator | None = None,
    progress: bool = False,
    start: int | None = None,
    record: Recorder | None = None,
) -> torch.Tensor:
    """Ancestral DDPM sampling over all T training timesteps (`steps` must equal T); MONAI's DDPM step.

    `generator` (on x_T's device) draws the per-step noise.
    """
    timesteps = timesteps_for("ddpm", schedule, steps, start)
    scheduler = schedule.to_monai()  # fresh state; clip_sample=False
    x = x_T.float()
    for t in _progress(timesteps, "ddpm", progress):
        _record(record, t, x)
        x, _ = scheduler.step(_call_model(model, x, t), t, x, generator=generator)
    return x


@torch.no_grad()
def sample_ddim(
    model: Model,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    steps: int,
    generator: torch.Generator | None = None,
    progress: bool = False,
    start: int | None = None,
    record: Recorder | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) over `timesteps_for("ddim", ...)`, ending at x0. `generator` is unused.

    Each step re-noises the predicted x0 with the predicted ε to the *next timestep in the list*, and the last step
    returns x̂0 (ᾱ = 1).
    """
    # Written out because MONAI's and diffusers' DDIMScheduler.step() infer the previous timestep as t − T//N,
    # which disagrees with their own timestep lists whenever N does not divide T (MONAI 1.6.1: off by up to 11 at N=10).
    timesteps = timesteps_for("ddim", schedule, steps, start)
    x = x_T.float()
    for i, t in enumerate(_progress(timesteps, "ddim", progress)):
        _record(record, t, x)
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x0_hat, eps_hat = schedule.predict_x0_eps(_call_model(model, x, t), x, t_batch)
        if i + 1 < len(timesteps):
            x = schedule.add_noise(x0_hat, eps_hat, torch.full_like(t_batch, timesteps[i + 1]))
        else:
            x = x0_hat
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: Model,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    steps: int,
    generator: torch.Generator | None = None,
    progress: bool = False,
    start: int | None = None,
    record: Recorder | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M): second-order multistep solver of the probability-flow ODE in data-prediction form.

    Uses diffusers' `DPMSolverMultistepScheduler` on this schedule's betas and `timesteps_for("dpm++", ...)`; the first
    step is first order (no history yet) and so is the last, which lands on ᾱ = 1 (x0). `generator` is unused.
    """
    from diffusers import DPMSolverMultistepScheduler  # imported here: costs seconds, needed only for sampling

    timesteps = timesteps_for("dpm++", schedule, steps, start)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=schedule.num_train_timesteps,
        trained_betas=schedule.betas.numpy(),
        prediction_type=schedule.prediction_type,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        thresholding=False,
    )
    scheduler.set_timesteps(timesteps=timesteps, device=x_T.device)
    scheduler.set_begin_index(0)
    x = x_T.float()
    for t in _progress(timesteps, "dpm++", progress):
        _record(record, t, x)
        x = scheduler.step(_call_model(model, x, t), t, x, return_dict=False)[0]
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpm++": sample_dpmpp_2m,
}
