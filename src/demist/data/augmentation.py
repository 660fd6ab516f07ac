"""Training-time augmentation of the condition images.

`random_bias_field`: a smooth multiplicative field on T1w + FLAIR patches, so that E_cond learns to read tissue and
not the residual receive field a bias correction leaves on a scanner's images (docs/preprocessing.md).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import RandBiasField

#: Degree of the Legendre polynomial of the field's logarithm (MONAI's default): up to three half-periods across a
#: patch, i.e. ~20 mm features on the alignment's 64 mm patches (`tiny`: 32³ voxels of 2 mm).
BIAS_FIELD_DEGREE = 3


def random_bias_field(images: torch.Tensor, coefficient: float, seed: int | None = None) -> torch.Tensor:
    """Each sample of `images` (B, C, X, Y, Z) times exp(a random degree-3 Legendre polynomial) whose coefficients are
    uniform in ±`coefficient` (MONAI `RandBiasField`), one field per sample shared by its channels (both images come
    from the same coil); deterministic in `seed`, which by default is drawn from torch's global generator (in training
    reseeded per step, shard and phase by `training.loop`). `coefficient` 0 returns `images` unchanged."""
    if coefficient <= 0:
        return images
    if seed is None:
        seed = int(torch.randint(2**31, ()))
    transform = RandBiasField(degree=BIAS_FIELD_DEGREE, coeff_range=(-coefficient, coefficient), prob=1.0)
    transform.set_random_state(seed=seed % 2**32)
    fields = [np.asarray(transform(np.ones((1, *images.shape[2:]), dtype=np.float32))) for _ in range(len(images))]
    return images * torch.from_numpy(np.stack(fields)).to(images)
