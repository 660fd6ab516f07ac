"""Baselines every DEMIST model must beat: a voxelwise ridge model, a constant predictor, and the deep
translation baselines KL-GAN, VQ-VAE and cWDM (`translation`).

All implement `demist.inference.base.Synthesizer` and save to run directories (method = the baseline's name,
stage "baseline"); `demist.methods` registers them. This module holds what their training commands share: which
manifest sessions to train on, and preparing them one at a time so memory does not grow with the cohort.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from tqdm import tqdm

from demist.config import Config
from demist.data.manifest import SessionRecord, training_records  # noqa: F401 - re-exported for the baselines
from demist.data.preprocess import PreparedSession, prepare_session

#: The stage name of every baseline run directory.
BASELINE_STAGE = "baseline"


def iter_prepared(records: Sequence[SessionRecord], config: Config, progress: bool = True) -> Iterator[PreparedSession]:
    """Prepare sessions lazily (with their PSR target), one at a time."""
    for record in tqdm(records, desc="sessions", unit="session", disable=not progress):
        yield prepare_session(record, config.data, need_target=True)
