"""The cWDM baseline: conditional diffusion of PSR in the 3D Haar wavelet domain, predicting x0.

PSR / psr_range and the [T1w, FLAIR] condition are each split into 8 Haar sub-bands (`wavelets.dwt3`, half the
resolution). A MONAI `DiffusionModelUNet` without conditioning inputs (channels `baselines.cwdm_channels`,
self-attention at the last level only) sees the noisy PSR sub-bands with the 16 condition sub-bands concatenated
and predicts the clean PSR sub-bands (prediction type "sample", the [diffusion] noise schedule); the loss is their
mean squared error. Sampling runs a `demist.diffusion.samplers` sampler (by default [sampling]'s `sampler` and
`steps`) on the whole volume, each network call tiled, then the inverse transform. Several samples give a
mean and a voxelwise SD.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from demist.baselines.translation import TranslationSynthesizer, train_translation
from demist.baselines.wavelets import SUBBANDS, dwt3, idwt3
from demist.config import Config
from demist.data.patches import PatchSampler
from demist.data.preprocess import PreparedSession
from demist.diffusion.samplers import SAMPLERS, check_sampler
from demist.diffusion.schedule import NoiseSchedule
from demist.errors import DemistError
from demist.inference.base import mean_and_sd, sample_seed
from demist.inference.tiling import tiled
from demist.models.autoencoder import COND_CHANNELS, PSR_CHANNELS
from demist.training.loop import Phase, Stage, warmup_cosine

METHOD = "cwdm"
PREDICTION_TYPE = "sample"  # x0: what image-space diffusion learns in a small budget (see the design notes)
TARGET_BANDS = PSR_CHANNELS * len(SUBBANDS)
COND_BANDS = COND_CHANNELS * len(SUBBANDS)


def cwdm_schedule(config: Config) -> NoiseSchedule:
    """The [diffusion] noise schedule with x0 prediction."""
    return NoiseSchedule.from_config(config.diffusion, PREDICTION_TYPE)


@dataclass
class CWDMSynthesizer(TranslationSynthesizer):
    """A trained cWDM; `sampler` and `steps` default to the config's [sampling] (DDPM: every training timestep)."""

    sampler: str | None = None
    steps: int | None = None
    method = METHOD
    prediction_type = PREDICTION_TYPE

    def __post_init__(self) -> None:
        self.sampler = self.sampler or self.config.sampling.sampler
        check_sampler(self.sampler)
        if self.steps is None:
            ddpm = self.sampler == "ddpm"
            self.steps = self.config.diffusion.num_train_timesteps if ddpm else self.config.sampling.steps
        self.schedule = cwdm_schedule(self.config)

    @classmethod
    def build_network(cls, config: Config) -> nn.Module:
        b = config.baselines
        below = len(b.cwdm_channels) - 1
        try:
            return DiffusionModelUNet(
                spatial_dims=3, in_channels=TARGET_BANDS + COND_BANDS, out_channels=TARGET_BANDS,
                channels=tuple(b.cwdm_channels), attention_levels=(False,) * below + (True,),
                num_head_channels=(0,) * below + (b.cwdm_num_head_channels,), num_res_blocks=b.cwdm_num_res_blocks,
                norm_num_groups=b.cwdm_norm_num_groups, include_fc=False, use_combined_linear=False,
                use_flash_attention=True)
        except ValueError as exc:  # MONAI's constructor checks (channels vs groups and heads, list lengths)
            raise DemistError(f"config [baselines] cwdm_*: {exc}; expected a valid MONAI DiffusionModelUNet "
                              "architecture") from None

    @classmethod
    def divisor(cls, config: Config) -> int:
        return 2 ** len(config.baselines.cwdm_channels)  # the wavelet transform halves, each UNet level below halves

    @property
    def wavelet_tile(self) -> tuple[int, ...]:
        return tuple(t // 2 for t in self.tile)

    def _denoiser(self, cond_bands: torch.Tensor, tile: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The sampler's model(x_t, t) → x̂0 sub-bands, conditioned on `cond_bands`, tiled over space if asked."""
        def net(stacked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return self.network(stacked, t).float()

        def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            stacked = torch.cat([x_t, cond_bands], dim=1)
            if not tile:
                return net(stacked, t)
            return tiled(net, stacked, self.wavelet_tile, self.config.sampling.tile_overlap, t=t)

        return model

    def _sample(self, cond_bands: torch.Tensor, generator: torch.Generator, tile: bool,
                progress: bool = False) -> torch.Tensor:
        """One PSR / psr_range sample (B, 1, D, H, W) from the condition sub-bands."""
        shape = (cond_bands.shape[0], TARGET_BANDS, *cond_bands.shape[2:])
        x_T = torch.randn(shape, generator=generator, device=self.device)
        bands = SAMPLERS[self.sampler](self._denoiser(cond_bands, tile), x_T, self.schedule, self.steps,
                                       generator=generator, progress=progress)
        return idwt3(bands).float()

    @torch.no_grad()
    def translate(self, condition: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One sample for a batch of patches, untiled."""
        generator = generator or torch.Generator(device=self.device).manual_seed(0)
        return self._sample(dwt3(condition.to(self.device)), generator, tile=False)

    @torch.no_grad()
    def predict(self, session: PreparedSession, samples: int = 1, seed: int = 0,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Mean and SD (None for one sample) over `samples` PSR / psr_range maps on the model grid."""
        if samples < 1:
            raise DemistError(f"samples: got {samples}; expected at least 1")
        condition, crop = self._condition(session)
        cond_bands = dwt3(condition)
        outputs = []
        for k in range(samples):
            generator = torch.Generator(device=self.device).manual_seed(sample_seed(seed, k))
            sample = self._sample(cond_bands, generator, tile=True, progress=progress)
            outputs.append(sample[crop][0, 0].cpu().numpy() * session.brain)
        return mean_and_sd(outputs)


def cwdm_stage(config: Config, network: nn.Module, sampler: PatchSampler) -> Stage:
    """One phase: ‖x̂0 − x0‖² over the PSR sub-bands at a uniformly drawn timestep."""
    b, schedule = config.baselines, cwdm_schedule(config)

    def loss(m, batch, step, ctx):
        x0, cond_bands = dwt3(batch["target"]), dwt3(batch["cond"])
        t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        prediction = m["network"](torch.cat([schedule.add_noise(x0, noise, t), cond_bands], dim=1), t)
        mse = torch.nn.functional.mse_loss(prediction.float(), schedule.training_target(x0, noise, t))
        return {"loss": mse}

    optimizer = torch.optim.Adam(network.parameters(), lr=b.learning_rate)
    return Stage(name=f"baseline-{METHOD}", modules={"network": network},
                 phases=[Phase("network", optimizer, loss, warmup_cosine(optimizer, b.steps))],
                 batch=sampler.batch, steps=b.steps)


def train_cwdm(manifest: str | Path, config: Config, out: str | Path, max_steps: int | None = None,
               device: str = "auto", resume: bool = False, subjects: Sequence[str] | None = None,
               tensorboard: bool = False) -> CWDMSynthesizer:
    """Train cWDM on the manifest's sessions (or those of `subjects`) into the run directory `out`."""
    return train_translation(CWDMSynthesizer, cwdm_stage, manifest, config, out, max_steps=max_steps,
                             device=device, resume=resume, subjects=subjects,
                             tensorboard=tensorboard)
