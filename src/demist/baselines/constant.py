"""The constant baseline: the training set's mean PSR / psr_range inside the brain, at every brain voxel.

It is the floor below which a method has learnt nothing from T1w and FLAIR (its R² over the training brains is
zero by construction). The mean is voxel-weighted over all training sessions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from demist.baselines import BASELINE_STAGE, iter_prepared, training_records
from demist.config import Config
from demist.data.preprocess import PreparedSession
from demist.errors import DemistError
from demist.runs import RunInfo, read_run, write_run
from demist.training.run_output import check_out

log = logging.getLogger(__name__)

METHOD = "constant"


@dataclass
class ConstantSynthesizer:
    """Predicts one value, PSR / psr_range, everywhere in the brain."""

    config: Config
    value: float
    training: dict[str, Any] = field(default_factory=dict)
    method = METHOD  # a class attribute, not a field: a constant model is always "constant"

    def predict(self, session: PreparedSession, samples: int = 1, seed: int = 0,
                progress: bool = False) -> tuple[np.ndarray, None]:
        """`value` inside the session's brain, zero outside; deterministic, so no SD."""
        if samples < 1:
            raise DemistError(f"samples: got {samples}; expected at least 1")
        return np.where(session.brain, np.float32(self.value), np.float32(0.0)).astype(np.float32), None

    def save(self, run_dir: str | Path) -> RunInfo:
        """Write `constant.safetensors` (the value) and run.json."""
        state = {"value": torch.tensor([self.value], dtype=torch.float64)}
        return write_run(run_dir, method=METHOD, stage=BASELINE_STAGE, config=self.config,
                         components={METHOD: state}, training=self.training)

    @classmethod
    def load(cls, run_dir: str | Path) -> "ConstantSynthesizer":
        """Read a constant run directory written by `save`."""
        run = read_run(run_dir, stages=BASELINE_STAGE, what="constant run")
        if run.method != METHOD:
            raise DemistError(f"constant run {run_dir}: holds method {run.method!r}; expected {METHOD!r}")
        state = run.weights(METHOD)
        if "value" not in state:
            raise DemistError(f"constant run {run_dir}: weights lack 'value'; expected a constant model")
        return cls(config=run.config, value=float(state["value"][0]), training=dict(run.training))


def fit_constant(sessions: Iterable[PreparedSession], config: Config) -> ConstantSynthesizer:
    """The mean PSR / psr_range over the brains of `sessions` (an exact fit)."""
    total, total_sq, count, keys = 0.0, 0.0, 0, []
    for session in sessions:
        if session.psr is None:
            raise DemistError(f"session {session.key}: has no PSR map; expected a training target")
        values = session.psr[session.brain].astype(np.float64)
        total += float(values.sum())
        total_sq += float(np.square(values).sum())
        count += values.size
        keys.append(session.key)
    if count == 0:
        raise DemistError("training sessions: none given; expected at least one session with a PSR map")
    mean = total / count
    sd = math.sqrt(max(total_sq / count - mean * mean, 0.0))
    log.info("constant: mean PSR/psr_range %.5f (SD %.5f) over %d brain voxels of %d sessions; training R² 0",
             mean, sd, count, len(keys))
    training = {"sessions": keys, "voxels": count, "sd_train": sd, "r2_train": 0.0}
    return ConstantSynthesizer(config=config, value=mean, training=training)


def train_constant(manifest: str | Path, config: Config, out: str | Path, subjects: Sequence[str] | None = None,
                   progress: bool = True) -> ConstantSynthesizer:
    """Fit on the manifest's sessions (or those of `subjects`), save to `out`, return the model."""
    check_out(Path(out), resume=False)  # before the fit: a finished run is never overwritten
    records = training_records(manifest, subjects)
    model = fit_constant(iter_prepared(records, config, progress), config)
    model.training["manifest"] = str(Path(manifest).resolve())
    model.save(out)
    return model
