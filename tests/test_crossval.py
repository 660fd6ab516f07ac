"""Subject-grouped folds and saved splits."""

from __future__ import annotations

import json

import pytest

from demist.errors import DemistError
from demist.evaluation.crossval import load_or_create_splits, subject_folds

# 14 subjects with 1-3 sessions each, listed once per session as a manifest would; 2:1 patients to controls.
SUBJECTS = [f"sub-{i:02d}" for i in range(14)]
SESSIONS = [s for i, s in enumerate(SUBJECTS) for _ in range(1 + i % 3)]
GROUPS = ["HC" if int(s[-2:]) % 3 == 0 else "MS" for s in SESSIONS]


@pytest.mark.parametrize("strata", [None, GROUPS], ids=["plain", "stratified"])
def test_every_subject_in_exactly_one_fold(strata):
    folds = subject_folds(SESSIONS, k=5, seed=0, strata=strata)
    assert len(folds) == 5 and all(folds)
    listed = [s for fold in folds for s in fold]
    assert sorted(listed) == SUBJECTS  # each subject once: never in two folds, none forgotten
    assert folds == subject_folds(SESSIONS, k=5, seed=0, strata=strata)
    reversed_strata = None if strata is None else list(reversed(strata))
    assert folds == subject_folds(list(reversed(SESSIONS)), k=5, seed=0, strata=reversed_strata)  # order-free
    assert folds != subject_folds(SESSIONS, k=5, seed=1, strata=strata)


def test_stratified_folds_mix_patients_and_controls():
    group_of = dict(zip(SESSIONS, GROUPS))
    for fold in subject_folds(SESSIONS, k=4, seed=0, strata=GROUPS):
        assert {group_of[s] for s in fold} == {"HC", "MS"}


@pytest.mark.parametrize("k", [1, 15, 2.5])
def test_bad_k_raises(k):
    with pytest.raises(DemistError):
        subject_folds(SESSIONS, k=k, seed=0)


def test_splits_are_saved_and_reused(tmp_path):
    path = tmp_path / "run" / "splits.json"
    folds = load_or_create_splits(path, SESSIONS, k=5, seed=7)
    saved = json.loads(path.read_text())
    assert saved == {"k": 5, "seed": 7, "folds": folds}
    before = path.stat().st_mtime_ns
    assert load_or_create_splits(path, SESSIONS, k=5, seed=7) == folds
    assert path.stat().st_mtime_ns == before  # read, not rewritten
    # a folder means <folder>/splits.json
    assert load_or_create_splits(tmp_path / "run", SESSIONS, k=5, seed=7) == folds
    assert [p.name for p in path.parent.iterdir()] == ["splits.json"]  # no temporary file left behind


@pytest.mark.parametrize("change", ["subject_added", "subject_removed", "k", "seed", "corrupt", "duplicated"])
def test_saved_splits_that_do_not_fit_raise(tmp_path, change):
    path = tmp_path / "splits.json"
    folds = load_or_create_splits(path, SESSIONS, k=5, seed=7)
    subjects, k, seed = list(SESSIONS), 5, 7
    if change == "subject_added":
        subjects.append("sub-99")
    elif change == "subject_removed":
        subjects = [s for s in subjects if s != folds[0][0]]
    elif change == "k":
        k = 4
    elif change == "seed":
        seed = 8
    elif change == "corrupt":
        path.write_text('{"k": 5, "seed"')
    elif change == "duplicated":
        folds[1].append(folds[0][0])
        path.write_text(json.dumps({"k": 5, "seed": 7, "folds": folds}))
    with pytest.raises(DemistError, match="splits.json"):
        load_or_create_splits(path, subjects, k, seed)
