"""What every synthesis method offers: a prediction on the model grid, from a prepared session.

DEMIST and each baseline implement `Synthesizer`; the pipeline around it (loading NIfTI, checking inputs, the way
back to the native grid, writing files) is shared, so every method is run and evaluated the same way.
"""

from __future__ import annotations

import re
from typing import Protocol, Sequence

import numpy as np

from demist.config import Config
from demist.data.preprocess import PreparedSession


#: Diagnostic rows scored beside the methods (`inference.references`): the PSR autoencoder's ceiling and the aligned
#: condition latent decoded without diffusion. They are never a method, nor the best method a test compares with.
REFERENCES = ("ae-ceiling", "aligned-condition")
#: Samples averaged in the "demist-meanK" row that the demo and the cross-validation score beside the single sample.
MEAN_SAMPLES = 3


def mean_row(samples: int, of: str = "demist") -> str:
    """The name of the row that averages `samples` samples per session of the row `of`."""
    return f"{of}-mean{samples}"


def row_source(row: str) -> str:
    """The method whose samples a row holds: `of` for `mean_row(k, of)`, the row itself otherwise."""
    match = re.fullmatch(r"(.+)-mean\d+", row)
    return match.group(1) if match else row


def sample_seed(seed: int, k: int) -> int:
    """The generator seed of sample `k` of a session synthesized with `seed` (distinct for every seed and k < 10⁶)."""
    return seed * 1_000_003 + k


def mean_and_sd(samples: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """A `predict` result from its samples: their voxelwise mean, and SD (None for a single sample)."""
    stack = np.stack(samples)
    std = stack.std(axis=0).astype(np.float32) if len(samples) > 1 else None
    return stack.mean(axis=0).astype(np.float32), std


class Synthesizer(Protocol):
    """A trained method that turns a prepared T1w + FLAIR session into PSR."""

    method: str
    config: Config

    def predict(
        self, session: PreparedSession, samples: int = 1, seed: int = 0, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """PSR / psr_range on the session's model grid: the mean over samples and the voxelwise SD (None if the
        method is deterministic)."""
        ...
