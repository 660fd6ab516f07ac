"""Training patches: random brain-centred crops of prepared sessions, as a pure function of (seed, step, shard).

`PatchSampler.batch(step, shard)` draws `batch_size` patches with a generator seeded by (seed, step, shard): the
same arguments always give the same patches, so training resumes exactly without saving any data-loader state,
and every process of a multi-process run draws its own shard. Sessions stay in memory as prepared arrays; a patch
is a slice, so no worker processes are needed.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np
import torch

from demist.config_sections import DataConfig
from demist.data.manifest import SessionRecord
from demist.data.preprocess import PreparedSession, prepare_session
from demist.errors import DemistError

logger = logging.getLogger(__name__)

#: The step index of the first fixed evaluation batch: far beyond any training step, so never drawn in training.
EVAL_STEP = 2**40
EVAL_BATCHES = 4  # evaluation batches a stage scores itself on


def load_sessions(records: Sequence[SessionRecord], data_cfg: DataConfig,
                  need_target: bool = True) -> list[PreparedSession]:
    """Prepare every session of a manifest (a progress bar when there are many)."""
    from tqdm.auto import tqdm

    if not records:
        raise DemistError("manifest: no sessions to train on; expected at least one row")
    bar = tqdm(records, desc="preparing sessions", disable=len(records) < 4, leave=False)
    # training never writes native maps, and a 1 mm native mask can outweigh a 2 mm session's own arrays
    return [dataclasses.replace(prepare_session(record, data_cfg, need_target=need_target), native_brain=None)
            for record in bar]


def session_arrays(session: PreparedSession, need_target: bool) -> dict[str, np.ndarray]:
    """A session as channel-first arrays: cond (2, …) = [T1w, FLAIR], brain (1, …) and target (1, …) = PSR."""
    arrays = {"cond": np.stack([session.t1w, session.flair]).astype(np.float32),
              "brain": session.brain[None].astype(np.float32)}
    if need_target:
        if session.psr is None:
            raise DemistError(f"session {session.key}: has no PSR map; expected one for training (manifest column psr)")
        arrays["target"] = session.psr[None].astype(np.float32)
    return arrays


def session_tensors(session: PreparedSession, need_target: bool = True) -> dict[str, torch.Tensor]:
    """`session_arrays` as (1, C, D, H, W) tensors: a whole volume as a batch of one."""
    return {k: torch.from_numpy(v)[None] for k, v in session_arrays(session, need_target).items()}


class PatchSampler:
    """Random patches of `patch_size` voxels whose centres are brain voxels chosen uniformly over all sessions."""

    def __init__(self, sessions: Sequence[PreparedSession], patch_size: Sequence[int], batch_size: int, seed: int,
                 need_target: bool = True) -> None:
        if not sessions:
            raise DemistError("patch sampler: no sessions; expected at least one prepared session")
        if batch_size < 1:
            raise DemistError(f"batch_size {batch_size}: expected an integer >= 1")
        self.patch = np.asarray(patch_size, dtype=int)
        if self.patch.shape != (3,) or (self.patch < 1).any():
            raise DemistError(f"patch_size {tuple(patch_size)}: expected three positive integers")
        self.batch_size, self.seed = batch_size, seed
        self.keys = [s.key for s in sessions]
        self.volumes = [self._pad(session_arrays(s, need_target)) for s in sessions]
        # Centres: brain voxels (in padded coordinates); a session's chance is its share of brain voxels.
        self.centres = [np.argwhere(v["brain"][0] > 0.5).astype(np.int32) for v in self.volumes]
        empty = [k for k, c in zip(self.keys, self.centres) if len(c) == 0]
        if empty:
            raise DemistError(f"session {empty[0]}: its brain mask is empty; expected brain voxels to sample from")
        counts = np.array([len(c) for c in self.centres], dtype=float)
        self.session_weights = counts / counts.sum()

    def _pad(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Zero-pad volumes smaller than a patch (symmetrically) so every patch lies inside the array."""
        shape = np.asarray(next(iter(arrays.values())).shape[1:])
        missing = np.maximum(self.patch - shape, 0)
        if not missing.any():
            return arrays
        pads = [(0, 0)] + [(int(m // 2), int(m - m // 2)) for m in missing]
        return {k: np.pad(v, pads) for k, v in arrays.items()}

    def corner(self, rng: np.random.Generator, index: int) -> np.ndarray:
        """The first voxel of a patch centred on a random brain voxel of session `index`, kept inside the volume."""
        centre = self.centres[index][rng.integers(len(self.centres[index]))]
        shape = np.asarray(self.volumes[index]["brain"].shape[1:])
        return np.clip(centre - self.patch // 2, 0, shape - self.patch)

    def batch(self, step: int, shard: int = 0) -> dict[str, torch.Tensor]:
        """The patches of one micro-batch: a pure function of (seed, step, shard). Tensors are (B, C, *patch)."""
        rng = np.random.default_rng([self.seed, step, shard])
        samples: dict[str, list[np.ndarray]] = {k: [] for k in self.volumes[0]}
        for _ in range(self.batch_size):
            index = int(rng.choice(len(self.volumes), p=self.session_weights))
            start = self.corner(rng, index)
            window = (slice(None), *(slice(int(a), int(a + p)) for a, p in zip(start, self.patch)))
            for key, volume in self.volumes[index].items():
                samples[key].append(volume[window])
        return {k: torch.from_numpy(np.stack(v)) for k, v in samples.items()}

    def evaluation_batches(self, count: int = EVAL_BATCHES) -> list[dict[str, torch.Tensor]]:
        """Fixed patches of the training sessions, never drawn as a training batch."""
        return [self.batch(EVAL_STEP + i, 0) for i in range(count)]
