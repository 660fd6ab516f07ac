"""DEMIST inference: encode the condition, sample the PSR latent with the conditioned frozen backbone, decode.

Fast on a CPU and bounded in memory: SDPA attention, bf16 autocast where the processor has it (`precision="fp32"`
is the reference path for checks), LoRA merged into the backbone, no gradients, and every network applied in
overlapping Gaussian-blended tiles (`tiling.tiled`) chosen under a memory budget (`memory.unet_tile`,
`memory.autoencoder_window`): the UNet at its training tile, the autoencoders at theirs when GroupNorm ties their
output to the window, and in one piece when the budget allows and nothing does.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from demist.config import Config
from demist.config_sections import check_anchor_sigma, check_start_strength
from demist.data.preprocess import PreparedSession
from demist.devices import bf16_autocast, has_native_bf16, resolve_device
from demist.diffusion.anchoring import anchored
from demist.diffusion.samplers import SAMPLERS, Model, check_sampler, timesteps_for
from demist.diffusion.schedule import NoiseSchedule
from demist.errors import DemistError
from demist.inference.base import mean_and_sd, sample_seed
from demist.inference.memory import DEFAULT_MAX_MEMORY_GIB, autoencoder_window, downsampling, resident_bytes, unet_tile
from demist.inference.tiling import tiled
from demist.models.from_runs import build_inference_networks
from demist.runs import RunInfo

log = logging.getLogger(__name__)

#: Overlap of the autoencoder windows (as in Stage 1's whole-volume evaluation).
AUTOENCODER_OVERLAP = 0.5
#: `precision`: "auto" runs bf16 autocast where the hardware has native bf16; "fp32" never (the reference path).
SYNTHESIS_PRECISIONS = ("auto", "fp32")


def check_sampling_options(sampler: str | None = None, start_strength: float | None = None,
                           anchor_sigma: float | None = None, max_memory: float | None = None,
                           precision: str | None = None) -> None:
    """The sampling options a user passes (None: not given), each against what any model accepts: `from_run` checks
    them, and `demist synthesize` before it loads a model (a baseline ignores them, but a wrong value is a mistake)."""
    if precision is not None and precision not in SYNTHESIS_PRECISIONS:
        raise DemistError(f"--precision {precision}: expected one of {', '.join(SYNTHESIS_PRECISIONS)}")
    if max_memory is not None and not max_memory > 0:
        raise DemistError(f"--max-memory {max_memory}: expected a positive number of GiB")
    if sampler is not None:
        check_sampler(sampler)
    if start_strength is not None:
        check_start_strength(float(start_strength), "--start-strength")
    if anchor_sigma is not None:
        check_anchor_sigma(anchor_sigma, "--anchor-sigma")


@dataclass
class DemistSynthesizer:
    """A trained DEMIST (or ablation) run, ready to sample. Build it with `from_run`."""

    method: str
    config: Config
    net: nn.Module  # DemistNet with LoRA merged: net(x_t, t, z_c)
    psr_autoencoder: nn.Module
    cond_autoencoder: nn.Module
    schedule: NoiseSchedule
    latent_scale_factor: float
    sampler: str
    steps: int
    device: torch.device
    use_bf16: bool = True
    start: int | None = None  # first timestep; None: T−1 from pure noise, else from z_c noised to it (SDEdit)
    max_memory_gib: float = DEFAULT_MAX_MEMORY_GIB
    anchor_sigma: float = 0.0  # > 0: x̂0's low-pass kept at the trajectory's first estimate (`diffusion.anchoring`)
    # NDHWC tensors: under bf16 on a CPU with AMX the autoencoders run 2.5× and a sampling step 1.6× faster than
    # NCDHW, in fp32 no faster (docs/inference.md). None: exactly where bf16 runs.
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        if self.channels_last is None:
            self.channels_last = self.use_bf16 and has_native_bf16(self.device)
        if self.channels_last:
            for module in (self.net, self.psr_autoencoder, self.cond_autoencoder):
                module.to(memory_format=torch.channels_last_3d)

    @classmethod
    def from_run(cls, run: RunInfo, sampler: str | None = None, steps: int | None = None,
                 device: str = "auto", start_strength: float | None = None, max_memory: float | None = None,
                 precision: str = "auto", anchor_sigma: float | None = None) -> "DemistSynthesizer":
        """Rebuild every network of a Stage-2 run and its parents (Stage 1, backbone) for inference.

        `start_strength` (default: the config's `sampling.start_strength`) below 1 starts sampling from z_c noised
        to timestep round(strength·(T−1)) instead of from pure noise. `anchor_sigma` (default: the config's
        `sampling.anchor_sigma`) above 0 anchors every x̂0's low-pass to the trajectory's first. `max_memory` (GiB,
        default 4) bounds the tiles; `precision="fp32"` turns bf16 autocast off."""
        cfg = run.config
        sampler = sampler or cfg.sampling.sampler
        check_sampling_options(sampler, start_strength, anchor_sigma, max_memory, precision)
        strength = cfg.sampling.start_strength if start_strength is None else float(start_strength)
        anchor = cfg.sampling.anchor_sigma if anchor_sigma is None else anchor_sigma
        total = cfg.diffusion.num_train_timesteps
        start = None if strength == 1.0 else int(round(strength * (total - 1)))
        if steps is None:  # the config's, but never more than the timesteps from `start` down to 0
            steps = total if sampler == "ddpm" else cfg.sampling.steps
            steps = steps if start is None else min(steps, start + 1)
        torch_device = resolve_device(device)
        nets = build_inference_networks(run, use_flash_attention=True)
        for module in (nets.net, nets.psr_autoencoder, nets.cond_autoencoder):
            module.to(torch_device).eval().requires_grad_(False)
        nets.net.merge_lora()
        schedule = NoiseSchedule.from_config(cfg.diffusion, nets.prediction_type)
        timesteps_for(sampler, schedule, int(steps), start)  # a bad --steps / --start-strength fails here, not later
        return cls(method=run.method, config=cfg, net=nets.net, psr_autoencoder=nets.psr_autoencoder,
                   cond_autoencoder=nets.cond_autoencoder, schedule=schedule,
                   latent_scale_factor=float(nets.latent_scale_factor), sampler=sampler, steps=int(steps),
                   device=torch_device, use_bf16=precision == "auto", start=start,
                   max_memory_gib=DEFAULT_MAX_MEMORY_GIB if max_memory is None else float(max_memory),
                   anchor_sigma=float(anchor))

    # -- the three networks, each tiled --------------------------------------------------------------------------

    def _resident(self) -> float:
        return resident_bytes((self.net, self.psr_autoencoder, self.cond_autoencoder))

    def _latent_tile(self, latent: tuple[int, ...]) -> tuple[int, int, int]:
        return unet_tile(self.config, latent, self.max_memory_gib, self._resident())

    def _window(self, part: str, spatial: tuple[int, ...]) -> tuple[int, int, int]:
        return autoencoder_window(self.config, part, spatial, self.max_memory_gib, self._resident())

    def _autocast(self) -> contextlib.AbstractContextManager:
        return bf16_autocast(self.device) if self.use_bf16 else contextlib.nullcontext()

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(memory_format=torch.channels_last_3d) if self.channels_last else x

    def encode_condition(self, condition: torch.Tensor) -> torch.Tensor:
        """z_c: the condition encoder's mean, times the latent scale factor."""
        def encode(x: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                return self.cond_autoencoder.encode(self._layout(x))[0].float()

        window = self._window("encode", tuple(condition.shape[2:]))
        return tiled(encode, condition, window, AUTOENCODER_OVERLAP, downsample=downsampling(self.config)
                     ) * self.latent_scale_factor

    def encode_target(self, psr: torch.Tensor) -> torch.Tensor:
        """z_y: the PSR encoder's mean of (B, 1, …) PSR / psr_range, times the latent scale factor (reference rows)."""
        def encode(x: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                return self.psr_autoencoder.encode(self._layout(x))[0].float()

        window = self._window("encode", tuple(psr.shape[2:]))
        return tiled(encode, psr, window, AUTOENCODER_OVERLAP, downsample=downsampling(self.config)
                     ) * self.latent_scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """PSR / psr_range from a (scaled) PSR latent."""
        def decode(x: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                return self.psr_autoencoder.decode(self._layout(x / self.latent_scale_factor)).float()

        return tiled(decode, z, self._window("decode", tuple(z.shape[2:])), AUTOENCODER_OVERLAP)

    def image_hint(self, condition: torch.Tensor) -> torch.Tensor | None:
        """The ControlNet's image hint at latent resolution (computed once per volume), or None if the net has none."""
        if not getattr(self.net, "uses_image", False):
            return None

        def embed(x: torch.Tensor) -> torch.Tensor:  # the synthesizer's precision, not the training's hint_bf16
            return self.net.embed_image(self._layout(x), bf16=self.use_bf16)

        # Plain convolutions (strided, or after a pixel unshuffle), no normalisation: large tiles (those of the UNet,
        # at image resolution) give the untiled result away from tile borders, at a fraction of the cost of the
        # autoencoders' small windows.
        factor = downsampling(self.config)
        latent = tuple(s // factor for s in condition.shape[2:])
        tile = tuple(factor * t for t in self._latent_tile(latent))
        return tiled(embed, condition, tile, self.config.sampling.tile_overlap, downsample=factor)

    def denoiser(self, z_c: torch.Tensor, image_hint: torch.Tensor | None = None) -> Model:
        """The model callable of the samplers: (x_t, t) -> prediction, conditioned on z_c (and the image hint),
        tiled: x_t, z_c and the hint are stacked along the channels so that every tile sees the same region."""
        channels = z_c.shape[1]

        def tile_fn(stacked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            stacked = self._layout(stacked)
            extra = (stacked[:, 2 * channels:],) if image_hint is not None else ()
            with self._autocast():
                return self.net(stacked[:, :channels], t, stacked[:, channels:2 * channels], *extra).float()

        tile = self._latent_tile(tuple(z_c.shape[2:]))

        def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            stacked = torch.cat([x_t, z_c, *([image_hint] if image_hint is not None else [])], dim=1)
            return tiled(tile_fn, stacked, tile, self.config.sampling.tile_overlap, t=t)

        return anchored(model, self.schedule, self.anchor_sigma) if self.anchor_sigma > 0 else model

    @torch.no_grad()
    def predict(self, session: PreparedSession, samples: int = 1, seed: int = 0,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Mean and SD over `samples` PSR / psr_range maps on the session's model grid."""
        condition = torch.from_numpy(session.condition)[None].to(self.device)
        z_c = self.encode_condition(condition)
        model = self.denoiser(z_c, self.image_hint(condition))
        sample_fn = SAMPLERS[self.sampler]
        outputs = []
        for k in range(samples):
            generator = torch.Generator(device=self.device).manual_seed(sample_seed(seed, k))
            x_T = torch.randn(z_c.shape, generator=generator, device=self.device)
            if self.start is not None:  # SDEdit: the aligned condition, noised to the first timestep
                x_T = self.schedule.add_noise(z_c, x_T, torch.full((1,), self.start, device=self.device))
            z0 = sample_fn(model, x_T, self.schedule, self.steps, generator=generator, progress=progress,
                           start=self.start)
            outputs.append(self.decode(z0)[0, 0].cpu().numpy())
            log.debug("sample %d/%d done", k + 1, samples)
        return mean_and_sd(outputs)
