"""Subject-grouped K-fold splits, saved once per experiment and reused.

All sessions of a subject fall in one fold, so no subject is seen in training and testing at once. The folds are
written to `splits.json` the first time and read back afterwards, so every method of a study is scored on the same
held-out subjects.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from demist.atomic import atomic_write
from demist.errors import DemistError

logger = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"


def subject_folds(
    subjects: Sequence[str], k: int, seed: int, strata: Sequence[str] | None = None
) -> list[list[str]]:
    """Split subjects into `k` folds: a list of k sorted lists of subject IDs, each subject in exactly one.

    `subjects` may list a subject once per session (e.g. from the manifest); sessions are then balanced across folds
    as the grouping allows. `sklearn.model_selection.GroupKFold(shuffle=True, random_state=seed)` does the split;
    with `strata` (one label per entry of `subjects`, e.g. the manifest's group, MS or HC) it is
    `StratifiedGroupKFold`, which keeps the patient/control ratio similar in every fold.
    """
    subjects = [str(s) for s in subjects]
    unique = sorted(set(subjects))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise DemistError(f"cross-validation: k={k!r}; expected an integer ≥ 2")
    if k > len(unique):
        raise DemistError(
            f"cross-validation: k={k} folds but only {len(unique)} subjects; expected k ≤ number of subjects"
        )
    sessions = np.arange(len(subjects))
    if strata is None:
        splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(sessions, groups=subjects)
    else:
        if len(strata) != len(subjects):
            raise DemistError(f"cross-validation: {len(strata)} strata for {len(subjects)} subjects; expected one each")
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(sessions, [str(s) for s in strata], groups=subjects)
    return [sorted({subjects[i] for i in test}) for _, test in splits]


def _check_saved(path: Path, saved: object, subjects: set[str], k: int, seed: int) -> list[list[str]]:
    """The folds of a loaded splits file, or DemistError if it does not fit this run."""
    if not (isinstance(saved, dict) and isinstance(saved.get("folds"), list)
            and all(isinstance(f, list) and all(isinstance(s, str) for s in f) for f in saved["folds"])):
        raise DemistError(
            f"{path}: not a demist splits file; expected JSON with 'k', 'seed' and 'folds' (lists of subject IDs)"
        )
    folds: list[list[str]] = saved["folds"]
    if saved.get("k") != k or len(folds) != k:
        raise DemistError(
            f"{path}: holds {len(folds)} folds (k={saved.get('k')}); this run asks for k={k}; "
            f"expected k={saved.get('k')} or delete the file"
        )
    if saved.get("seed") != seed:
        raise DemistError(
            f"{path}: was made with seed {saved.get('seed')}; this run asks for seed {seed}; "
            f"expected seed {saved.get('seed')} or delete the file"
        )
    listed = [s for fold in folds for s in fold]
    if len(listed) != len(set(listed)):
        raise DemistError(f"{path}: a subject appears in more than one fold; expected each subject once")
    if set(listed) != subjects:
        missing, extra = sorted(subjects - set(listed)), sorted(set(listed) - subjects)
        raise DemistError(
            f"{path}: subjects differ from the manifest (missing {missing[:5]}, not in manifest {extra[:5]}); "
            "expected the manifest's subjects, or delete the file to make new splits"
        )
    return folds


def load_or_create_splits(
    path: str | Path, subjects: Sequence[str], k: int, seed: int, strata: Sequence[str] | None = None
) -> list[list[str]]:
    """Read the folds from `path` (a JSON file, or a folder holding `splits.json`), or make and save them.

    The file holds {"k", "seed", "folds"}. A saved file must list exactly the (distinct) `subjects` and match `k` and
    `seed`, otherwise DemistError: changing the cohort or the split silently would mix results across splits.
    """
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / SPLITS_FILE
    unique = set(str(s) for s in subjects)
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DemistError(f"{path}: not readable as JSON ({exc}); expected a demist splits file") from None
        folds = _check_saved(path, saved, unique, k, seed)
        logger.info("reusing %d-fold splits from %s", k, path)
        return folds
    folds = subject_folds(subjects, k, seed, strata)
    atomic_write(path, json.dumps({"k": k, "seed": seed, "folds": folds}, indent=2) + "\n")
    logger.info("wrote %d-fold splits of %d subjects to %s", k, len(unique), path)
    return folds
