"""The VQ-VAE baseline: MONAI `VQVAE` translating [T1w, FLAIR] to PSR through a vector-quantised bottleneck.

Architecture from [baselines]: one level per entry of `vq_channels`, each downsampling 2× (stride-2, kernel-4
convolutions, mirrored by transposed convolutions), one residual layer per level, a codebook of
`vq_num_embeddings` vectors of `vq_embedding_dim`, updated by MONAI's exponential moving average. Loss: L1 (+ L2)
against PSR / psr_range as the other baselines (`translation_loss`) + MONAI's quantisation (commitment) loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from monai.networks.nets import VQVAE
from torch import nn

from demist.baselines.translation import TranslationSynthesizer, train_translation, translation_loss
from demist.config import Config
from demist.data.patches import PatchSampler
from demist.errors import DemistError
from demist.models.autoencoder import COND_CHANNELS, PSR_CHANNELS
from demist.training.loop import Phase, Stage, warmup_cosine

METHOD = "vqvae"
DOWNSAMPLE = (2, 4, 1, 1)  # stride, kernel size, dilation, padding: halves each axis exactly
UPSAMPLE = (2, 4, 1, 1, 0)  # the same, plus output padding, for the transposed convolutions


class VQVAESynthesizer(TranslationSynthesizer):
    """A trained VQ-VAE: PSR / psr_range = D(quantise(E([T1w, FLAIR])))."""

    method = METHOD

    @classmethod
    def build_network(cls, config: Config) -> nn.Module:
        b = config.baselines
        levels = len(b.vq_channels)
        try:
            return VQVAE(spatial_dims=3, in_channels=COND_CHANNELS, out_channels=PSR_CHANNELS,
                         channels=tuple(b.vq_channels), num_res_layers=1, num_res_channels=tuple(b.vq_channels),
                         downsample_parameters=(DOWNSAMPLE,) * levels, upsample_parameters=(UPSAMPLE,) * levels,
                         num_embeddings=b.vq_num_embeddings, embedding_dim=b.vq_embedding_dim)
        except ValueError as exc:  # MONAI's constructor checks (list lengths)
            raise DemistError(f"config [baselines] vq_*: {exc}; expected a valid MONAI VQVAE architecture") from None

    @classmethod
    def divisor(cls, config: Config) -> int:
        return 2 ** len(config.baselines.vq_channels)

    def translate(self, condition: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        with self.autocast():
            return self.network(condition)[0].float()


def vqvae_stage(config: Config, network: nn.Module, sampler: PatchSampler) -> Stage:
    """One phase: reconstruction of PSR + quantisation loss (the codebook itself moves by EMA, not by gradient)."""
    b = config.baselines

    def loss(m, batch, step, ctx):
        prediction, quantization = m["network"](batch["cond"])
        terms = {"recon": translation_loss(config, prediction, batch), "quantization": quantization.float().mean()}
        return {"loss": terms["recon"] + terms["quantization"], **terms}

    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=b.learning_rate)
    return Stage(name=f"baseline-{METHOD}", modules={"network": network},
                 phases=[Phase("network", optimizer, loss, warmup_cosine(optimizer, b.steps))],
                 batch=sampler.batch, steps=b.steps)


def train_vqvae(manifest: str | Path, config: Config, out: str | Path, max_steps: int | None = None,
                device: str = "auto", resume: bool = False, subjects: Sequence[str] | None = None,
                tensorboard: bool = False
                ) -> VQVAESynthesizer:
    """Train the VQ-VAE on the manifest's sessions (or those of `subjects`) into the run directory `out`."""
    return train_translation(VQVAESynthesizer, vqvae_stage, manifest, config, out, max_steps=max_steps,
                             device=device, resume=resume, subjects=subjects,
                             tensorboard=tensorboard)
