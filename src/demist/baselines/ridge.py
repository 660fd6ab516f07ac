"""The voxelwise ridge baseline: PSR / psr_range as a linear function of T1w/FLAIR features (see `features`).

Fitting draws a seeded, equal-sized random subsample of brain voxels from every training session (at most
`max_voxels` in all), so every session weighs the same and memory stays bounded; `RidgeCV` picks the penalty by
efficient leave-one-out. Prediction is the same linear map at every brain voxel, zero outside the brain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from sklearn.linear_model import RidgeCV

from demist.baselines import BASELINE_STAGE, iter_prepared, training_records
from demist.baselines.features import FeatureSpec, feature_matrix, iter_feature_volumes
from demist.config import Config
from demist.data.preprocess import PreparedSession
from demist.errors import DemistError
from demist.runs import RunInfo, read_run, write_run
from demist.training.run_output import check_out

log = logging.getLogger(__name__)

METHOD = "ridge"
#: Penalties tried by RidgeCV; features are all O(1) (percentile-scaled inputs), so one grid fits every cohort.
DEFAULT_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_MAX_VOXELS = 200_000


@dataclass
class RidgeSynthesizer:
    """A fitted linear map from voxel features to PSR / psr_range."""

    config: Config
    spec: FeatureSpec
    coef: np.ndarray  # (F,) float64, in `spec.names` order
    intercept: float
    training: dict[str, Any] = field(default_factory=dict)
    method = METHOD  # a class attribute, not a field: a ridge model is always "ridge"

    def __post_init__(self) -> None:
        self.coef = np.asarray(self.coef, dtype=np.float64).reshape(-1)
        if self.coef.size != len(self.spec.names):
            raise DemistError(f"ridge coefficients: {self.coef.size} values; expected {len(self.spec.names)} "
                              f"for features {', '.join(self.spec.names)}")

    def predict(self, session: PreparedSession, samples: int = 1, seed: int = 0,
                progress: bool = False) -> tuple[np.ndarray, None]:
        """PSR / psr_range on the session's model grid (zero outside the brain); deterministic, so no SD."""
        if samples < 1:
            raise DemistError(f"samples: got {samples}; expected at least 1")
        brain = session.brain
        values = np.full(int(brain.sum()), self.intercept, dtype=np.float64)
        for weight, (_, volume) in zip(self.coef, iter_feature_volumes(session, self.spec)):
            values += weight * volume[brain]
        out = np.zeros(brain.shape, dtype=np.float32)
        out[brain] = values
        return out, None

    def save(self, run_dir: str | Path) -> RunInfo:
        """Write `ridge.safetensors` (coefficients, intercept, feature σs, product flag) and run.json."""
        state = {
            "coef": torch.from_numpy(self.coef.copy()),
            "intercept": torch.tensor([self.intercept], dtype=torch.float64),
            "sigmas_mm": torch.tensor(self.spec.sigmas_mm, dtype=torch.float64),
            "products": torch.tensor([int(self.spec.products)], dtype=torch.uint8),
        }
        # the safetensors file is authoritative; run.json repeats the map by name for people reading it
        training = {**self.training, "features": self.spec.names, "intercept": self.intercept,
                    "coefficients": dict(zip(self.spec.names, self.coef.tolist()))}
        return write_run(run_dir, method=METHOD, stage=BASELINE_STAGE, config=self.config,
                         components={METHOD: state}, training=training)

    @classmethod
    def load(cls, run_dir: str | Path) -> "RidgeSynthesizer":
        """Read a ridge run directory written by `save`."""
        run = read_run(run_dir, stages=BASELINE_STAGE, what="ridge run")
        if run.method != METHOD:
            raise DemistError(f"ridge run {run_dir}: holds method {run.method!r}; expected {METHOD!r}")
        state = run.weights(METHOD)
        missing = [k for k in ("coef", "intercept", "sigmas_mm", "products") if k not in state]
        if missing:
            raise DemistError(f"ridge run {run_dir}: weights lack {', '.join(missing)}; expected a ridge model")
        spec = FeatureSpec(sigmas_mm=tuple(float(s) for s in state["sigmas_mm"].tolist()),
                           products=bool(int(state["products"][0])))
        return cls(config=run.config, spec=spec, coef=state["coef"].numpy(),
                   intercept=float(state["intercept"][0]), training=dict(run.training))


def sample_rows(sessions: Iterable[PreparedSession], per_session: int, spec: FeatureSpec,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features and targets of up to `per_session` random brain voxels of each session: (X, y, session keys)."""
    blocks, targets, keys = [], [], []
    for session in sessions:
        if session.psr is None:
            raise DemistError(f"session {session.key}: has no PSR map; expected a training target")
        brain_index = np.flatnonzero(session.brain)
        chosen = rng.choice(brain_index, size=min(per_session, brain_index.size), replace=False)
        chosen.sort()  # reading in memory order; the fit does not depend on row order
        blocks.append(feature_matrix(session, spec, chosen))
        targets.append(session.psr.reshape(-1)[chosen].astype(np.float64))
        keys.append(session.key)
    if not blocks:
        raise DemistError("training sessions: none given; expected at least one session with a PSR map")
    return np.concatenate(blocks), np.concatenate(targets), keys


def _fit(sessions: Iterable[PreparedSession], n_sessions: int, config: Config, seed: int, spec: FeatureSpec,
         alphas: Sequence[float], max_voxels: int) -> RidgeSynthesizer:
    if max_voxels < 1:
        raise DemistError(f"max_voxels: got {max_voxels}; expected a positive number of voxels")
    rng = np.random.default_rng(seed)
    per_session = max(1, max_voxels // max(1, n_sessions))
    x, y, keys = sample_rows(sessions, per_session, spec, rng)
    model = RidgeCV(alphas=list(alphas), fit_intercept=True).fit(x, y)
    r2 = float(model.score(x, y))
    log.info("ridge: %d voxels of %d sessions, %d features, alpha %g, training R² %.4f",
             y.size, len(keys), x.shape[1], model.alpha_, r2)
    training = {"seed": seed, "sessions": keys, "voxels": int(y.size), "alpha": float(model.alpha_), "r2_train": r2}
    return RidgeSynthesizer(config=config, spec=spec, coef=model.coef_, intercept=float(model.intercept_),
                            training=training)


def fit_ridge(train: list[PreparedSession], config: Config, seed: int, spec: FeatureSpec | None = None,
              alphas: Sequence[float] = DEFAULT_ALPHAS, max_voxels: int = DEFAULT_MAX_VOXELS) -> RidgeSynthesizer:
    """Fit the ridge baseline on prepared sessions (each must carry `psr`)."""
    return _fit(train, len(train), config, seed, spec or FeatureSpec(), alphas, max_voxels)


def train_ridge(manifest: str | Path, config: Config, out: str | Path, subjects: Sequence[str] | None = None,
                progress: bool = True) -> RidgeSynthesizer:
    """Fit on the manifest's sessions (or those of `subjects`), save to `out`, return the model.

    Sessions are prepared one at a time; the fit is a small least-squares problem on the CPU.
    """
    check_out(Path(out), resume=False)  # before the fit: a finished run is never overwritten
    records = training_records(manifest, subjects)
    model = _fit(iter_prepared(records, config, progress), len(records), config, config.train.seed, FeatureSpec(),
                 DEFAULT_ALPHAS, DEFAULT_MAX_VOXELS)
    model.training["manifest"] = str(Path(manifest).resolve())
    model.save(out)
    return model
