"""Latent training patches: each session is encoded once, whole, and patches are cropped from its latents.

The diffusion stages learn in the latent of the frozen Stage-1 encoders. Encoding every training patch anew, window
by window, cost more than the diffusion step itself. Here each session is encoded once, whole, in overlapping
windows of the autoencoders' training patch size (`encode_volume`), the way `demist synthesize` encodes a volume
(there in tiles, bf16 where the CPU has it), so the diffusion stages learn on latents like those they will meet. A
patch is then a latent crop plus the image crop it covers (for the edge term), drawn as a pure function of (seed,
step, shard) like `PatchSampler`, so resume stays exact.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from demist.data.patches import EVAL_BATCHES, EVAL_STEP, session_arrays
from demist.data.preprocess import PreparedSession
from demist.errors import DemistError
from demist.models.autoencoder import encode_volume

logger = logging.getLogger(__name__)

#: Batches of `LatentPatchSampler.batch` at or beyond this step are evaluation patches, never drawn in training.


@dataclass(frozen=True)
class LatentSession:
    """One session: image arrays (C, D, H, W) padded to whole latent voxels, and its latents (C, d, h, w)."""

    key: str
    images: dict[str, np.ndarray]
    latents: dict[str, np.ndarray]


def _padded(arrays: dict[str, np.ndarray], factor: int, minimum: np.ndarray) -> dict[str, np.ndarray]:
    """Zero-pad at the far end of each axis: up to `minimum` voxels and a multiple of `factor` (the latent grid stays
    aligned with voxel 0 of the image)."""
    shape = np.asarray(next(iter(arrays.values())).shape[1:])
    target = np.ceil(np.maximum(shape, minimum) / factor).astype(int) * factor
    pads = [(0, 0)] + [(0, int(t - s)) for s, t in zip(shape, target)]
    return {k: np.pad(v, pads) for k, v in arrays.items()}


def encoding_device(device: str) -> torch.device:
    """Where to encode before training: this process's GPU (by LOCAL_RANK in a multi-process launch), else the CPU."""
    from demist.devices import resolve_device

    if resolve_device(device).type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@torch.no_grad()
def encode_sessions(sessions: Sequence[PreparedSession], encoders: dict[str, tuple[nn.Module, str]],
                    scale_factor: float, window: Sequence[int], factor: int, patch_size: Sequence[int],
                    device: torch.device | str = "cpu", keep: Sequence[str] = ()) -> list[LatentSession]:
    """Encode every session whole: `encoders` maps a latent name to (autoencoder, image key), e.g.
    {"z_y": (psr_ae, "target"), "z_c": (cond_ae, "cond")}; latents are μ × `scale_factor`, kept in float32 on the
    CPU. Of the images, only the brain mask (where patches are centred) and the `keep` keys stay in memory. The
    encoders run on `device` and are returned to the CPU."""
    from tqdm.auto import tqdm

    # Far-end padding up to the training patch and the encoder window: MONAI's sliding window would otherwise pad a
    # smaller volume on both sides, by amounts that need not be whole latent voxels.
    minimum = np.maximum(np.asarray(patch_size, dtype=int), np.asarray(window, dtype=int))
    for model, _ in encoders.values():
        model.to(device)
    out = []
    for session in tqdm(sessions, desc="encoding sessions", leave=False, disable=len(sessions) < 4):
        images = _padded(session_arrays(session, need_target=True), factor, minimum)
        latents = {}
        for name, (model, key) in encoders.items():
            image = torch.from_numpy(images[key])[None].to(device)
            latents[name] = (encode_volume(model, image, window)[0].float() * scale_factor).cpu().numpy()
        kept = {k: v for k, v in images.items() if k == "brain" or k in keep}
        out.append(LatentSession(session.key, kept, latents))
    for model, _ in encoders.values():
        model.cpu()
    first = "x".join(str(s) for s in next(iter(out[0].latents.values())).shape[1:]) if out and out[0].latents else "-"
    logger.info("encoded %d sessions into latents of %s voxels (first session)", len(out), first)
    return out


class LatentPatchSampler:
    """Random latent patches of `patch_size // factor` voxels whose centres are brain voxels, uniform over all
    sessions, with the image patches of `patch_size` voxels they cover."""

    def __init__(self, sessions: Sequence[LatentSession], patch_size: Sequence[int], factor: int, batch_size: int,
                 seed: int, image_keys: Sequence[str] = ("target", "brain")) -> None:
        if not sessions:
            raise DemistError("latent patch sampler: no sessions; expected at least one encoded session")
        if batch_size < 1:
            raise DemistError(f"batch_size {batch_size}: expected an integer >= 1")
        self.patch = np.asarray(patch_size, dtype=int)
        if self.patch.shape != (3,) or (self.patch < factor).any() or (self.patch % factor).any():
            raise DemistError(f"patch_size {tuple(patch_size)}: expected three multiples of the autoencoder's "
                              f"downsampling factor {factor}")
        self.factor, self.batch_size, self.seed = factor, batch_size, seed
        self.sessions, self.image_keys = list(sessions), tuple(image_keys)
        self.latent_patch = self.patch // factor
        self.centres = [np.argwhere(s.images["brain"][0] > 0.5).astype(np.int32) // factor for s in self.sessions]
        empty = [s.key for s, c in zip(self.sessions, self.centres) if len(c) == 0]
        if empty:
            raise DemistError(f"session {empty[0]}: its brain mask is empty; expected brain voxels to sample from")
        counts = np.array([len(c) for c in self.centres], dtype=float)
        self.session_weights = counts / counts.sum()

    def batch(self, step: int, shard: int = 0) -> dict[str, torch.Tensor]:
        """One micro-batch, a pure function of (seed, step, shard): latents (B, C, *patch // factor) and images
        (B, C, *patch)."""
        rng = np.random.default_rng([self.seed, step, shard])
        samples: dict[str, list[np.ndarray]] = {}
        for _ in range(self.batch_size):
            index = int(rng.choice(len(self.sessions), p=self.session_weights))
            session = self.sessions[index]
            centre = self.centres[index][rng.integers(len(self.centres[index]))]
            latent_shape = np.asarray(next(iter(session.latents.values())).shape[1:]) if session.latents else (
                np.asarray(session.images["brain"].shape[1:]) // self.factor)
            corner = np.clip(centre - self.latent_patch // 2, 0, latent_shape - self.latent_patch)
            latent_window = (slice(None), *(slice(int(a), int(a + p)) for a, p in zip(corner, self.latent_patch)))
            image_window = (slice(None), *(slice(int(a) * self.factor, int(a + p) * self.factor)
                                           for a, p in zip(corner, self.latent_patch)))
            for key, latent in session.latents.items():
                samples.setdefault(key, []).append(latent[latent_window])
            for key in self.image_keys:
                samples.setdefault(key, []).append(session.images[key][image_window])
        return {k: torch.from_numpy(np.ascontiguousarray(np.stack(v))) for k, v in samples.items()}

    def evaluation_batches(self, count: int = EVAL_BATCHES) -> list[dict[str, torch.Tensor]]:
        """Fixed patches of the training sessions, never drawn as a training batch."""
        return [self.batch(EVAL_STEP + i, 0) for i in range(count)]
