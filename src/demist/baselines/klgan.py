"""The KL-GAN baseline: a MONAI AutoencoderKL-style encoder-decoder that maps [T1w, FLAIR] to PSR directly.

The network has the [autoencoder] architecture with 2 input channels and 1 output channel. Its loss is the Stage-1
autoencoder's without the edge term, aimed at PSR instead of the input: L1 (+ L2) against PSR / psr_range (voxels
outside the brain down-weighted) + λ_KL·KL of the latent + λ_adv·patch-adversarial (least squares, Stage 1's MONAI
`PatchDiscriminator` on PSR, from `baselines.klgan_adv_start`). Weights come from [stage1]; steps, batch size and
learning rate from [baselines]. Prediction decodes the latent mean, so it is deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from monai.networks.nets import AutoencoderKL
from torch import nn

from demist.baselines.translation import TranslationSynthesizer, train_translation, translation_loss
from demist.config import Config
from demist.data.patches import PatchSampler
from demist.errors import DemistError
from demist.models.autoencoder import COND_CHANNELS, PSR_CHANNELS, autoencoder_kwargs, downsampling_factor
from demist.training.loop import Phase, Stage, warmup_cosine
from demist.training.losses import kl_divergence
from demist.training.stage1 import build_discriminator

METHOD = "klgan"


class KLGANSynthesizer(TranslationSynthesizer):
    """A trained KL-GAN: PSR / psr_range = D(μ(E([T1w, FLAIR])))."""

    method = METHOD

    @classmethod
    def build_network(cls, config: Config) -> nn.Module:
        kwargs = {**autoencoder_kwargs(config.autoencoder, COND_CHANNELS), "out_channels": PSR_CHANNELS}
        try:
            return AutoencoderKL(**kwargs)
        except ValueError as exc:  # MONAI's constructor checks (channels vs groups, list lengths)
            raise DemistError(f"config [autoencoder]: {exc}; expected a valid MONAI AutoencoderKL "
                              "architecture") from None

    @classmethod
    def divisor(cls, config: Config) -> int:
        return downsampling_factor(config.autoencoder)

    def translate(self, condition: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        with self.autocast():
            return self.network.decode(self.network.encode(condition)[0]).float()


def klgan_stage(config: Config, generator: nn.Module, sampler: PatchSampler) -> Stage:
    """Two phases: the encoder-decoder (reconstruction + KL + adversarial) and, from `klgan_adv_start`, the critic."""
    from monai.losses import PatchAdversarialLoss

    s1, b = config.stage1, config.baselines
    discriminator = build_discriminator(config, PSR_CHANNELS)
    adversarial = PatchAdversarialLoss(criterion="least_squares")
    adv_on = lambda step: s1.adv_weight > 0 and step >= b.klgan_adv_start  # noqa: E731

    def generator_loss(m, batch, step, ctx):
        prediction, mu, sigma = m["generator"](batch["cond"])
        terms = {"recon": translation_loss(config, prediction, batch), "kl": kl_divergence(mu, sigma)}
        total = terms["recon"] + s1.kl_weight * terms["kl"]
        if adv_on(step):
            terms["adv"] = adversarial(m["discriminator"](prediction.float())[-1], target_is_real=True,
                                       for_discriminator=False)
            total = total + s1.adv_weight * terms["adv"]
            ctx["fake"] = prediction.detach().float()
        return {"loss": total, **terms}

    def discriminator_loss(m, batch, step, ctx):
        real_logits, fake_logits = m["discriminator"](torch.cat([batch["target"], ctx["fake"]]))[-1].chunk(2)
        return {"loss": 0.5 * (adversarial(real_logits, target_is_real=True, for_discriminator=True)
                               + adversarial(fake_logits, target_is_real=False, for_discriminator=True))}

    gen_opt = torch.optim.Adam(generator.parameters(), lr=b.learning_rate)
    disc_opt = torch.optim.Adam(discriminator.parameters(), lr=b.learning_rate)
    return Stage(name=f"baseline-{METHOD}", modules={"generator": generator, "discriminator": discriminator},
                 phases=[Phase("generator", gen_opt, generator_loss, warmup_cosine(gen_opt, b.steps)),
                         Phase("discriminator", disc_opt, discriminator_loss, active=adv_on)],
                 batch=sampler.batch, steps=b.steps)


def train_klgan(manifest: str | Path, config: Config, out: str | Path, max_steps: int | None = None,
                device: str = "auto", resume: bool = False, subjects: Sequence[str] | None = None,
                tensorboard: bool = False
                ) -> KLGANSynthesizer:
    """Train KL-GAN on the manifest's sessions (or those of `subjects`) into the run directory `out`."""
    return train_translation(KLGANSynthesizer, klgan_stage, manifest, config, out, max_steps=max_steps,
                             device=device, resume=resume, subjects=subjects,
                             tensorboard=tensorboard)
