"""Summaries across folds or sessions, paired t-tests, and their markdown/CSV writers."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from demist.errors import DemistError
from demist.evaluation.stats import (
    paired_tests,
    summarise_folds,
    summarise_sessions,
    summary_markdown,
    write_summary_csv,
    write_summary_markdown,
)


def per_session_table() -> list[dict]:
    """Three methods on 12 held-out sessions in 3 folds: 'good' beats 'ok' by a consistent margin, 'tie' = 'ok'."""
    rng = np.random.default_rng(0)
    rows = []
    for index in range(12):
        base = 24 + rng.normal(0, 1.5)
        for method, shift in (("good", 1.0), ("ok", 0.0), ("tie", 0.0)):
            psnr = base + shift + (rng.normal(0, 0.2) if method == "good" else 0.0)
            rows.append({"method": method, "fold": index % 3, "subject": f"sub-{index:02d}", "session": "ses-01",
                         "psnr": psnr, "mse": 10 ** (-psnr / 10)})
    return rows


def test_summary_is_mean_and_sd_across_fold_means():
    rows = per_session_table()
    summary = summarise_folds(rows, metrics=("psnr", "mse"))
    good = [r["psnr"] for r in rows if r["method"] == "good"]
    fold_means = [np.mean(good[f::3]) for f in range(3)]
    assert summary["good"]["psnr"]["mean"] == pytest.approx(np.mean(fold_means))
    assert summary["good"]["psnr"]["sd"] == pytest.approx(np.std(fold_means, ddof=1))
    assert summary["good"]["psnr"]["n_folds"] == 3 and summary["good"]["psnr"]["n_sessions"] == 12


def test_summary_weights_folds_not_sessions():
    """Folds of unequal size: the mean of the fold means differs from the mean over all sessions."""
    values = {0: [20.0] * 6, 1: [24.0] * 4, 2: [30.0] * 2}
    rows = [{"method": "m", "fold": fold, "subject": f"sub-{fold}{i}", "session": "ses-01", "psnr": v}
            for fold, vs in values.items() for i, v in enumerate(vs)]
    entry = summarise_folds(rows, metrics=("psnr",))["m"]["psnr"]
    assert entry["mean"] == pytest.approx(np.mean([20.0, 24.0, 30.0]))
    assert entry["mean"] != pytest.approx(np.mean([r["psnr"] for r in rows]))
    assert entry["n_folds"] == 3 and entry["n_sessions"] == 12


def test_paired_tests_pair_over_the_sessions_both_scored():
    """Rows in another order and sessions missing for one method: pairs follow the session keys."""
    from scipy.stats import ttest_rel

    rows = per_session_table()
    good = [r for r in rows if r["method"] == "good"][2:]  # two sessions unscored
    ok = list(reversed([r for r in rows if r["method"] == "ok"]))
    result = paired_tests(good + ok, metrics=("psnr",))["psnr"]["good"]
    shared = sorted({r["subject"] for r in good})
    a = [next(r["psnr"] for r in good if r["subject"] == s) for s in shared]
    b = [next(r["psnr"] for r in ok if r["subject"] == s) for s in shared]
    expected = ttest_rel(a, b)
    assert result["vs"] == "ok" and result["n"] == 10
    assert result["t"] == pytest.approx(float(expected.statistic))
    assert result["p"] == pytest.approx(float(expected.pvalue))


def test_paired_tests_compare_with_the_best_other_method():
    tests = paired_tests(per_session_table(), metrics=("psnr", "mse"))
    for metric in ("psnr", "mse"):  # psnr higher-is-better, mse lower-is-better: the same ranking
        assert tests[metric]["good"]["vs"] in {"ok", "tie"}
        assert tests[metric]["good"]["significant"] and tests[metric]["good"]["n"] == 12
        assert tests[metric]["ok"]["vs"] == "good" and tests[metric]["ok"]["significant"]
    assert tests["psnr"]["good"]["t"] > 0 and tests["mse"]["good"]["t"] < 0
    # identical methods: no difference to test
    only_ties = [r for r in per_session_table() if r["method"] != "good"]
    tie = paired_tests(only_ties, metrics=("psnr",))["psnr"]["ok"]
    assert math.isnan(tie["p"]) and not tie["significant"]


def test_paired_tests_pair_subjects_not_sessions():
    """Two sessions per subject: the test runs over the subjects' session means, n counts subjects."""
    from scipy.stats import ttest_rel

    rng = np.random.default_rng(2)
    rows, means = [], {"good": [], "ok": []}
    for subject in range(6):
        level = rng.normal(24, 1.5)
        for method, shift in (("good", 0.5), ("ok", 0.0)):
            values = [level + shift + rng.normal(0, 0.3) for _ in range(2)]
            means[method].append(np.mean(values))
            rows += [{"method": method, "subject": f"sub-{subject}", "session": f"ses-{i}", "psnr": v}
                     for i, v in enumerate(values)]
    result = paired_tests(rows, metrics=("psnr",))["psnr"]["good"]
    expected = ttest_rel(means["good"], means["ok"])
    assert result["n"] == 6 and result["n_sessions"] == 12
    assert result["p"] == pytest.approx(float(expected.pvalue)) and result["t"] == pytest.approx(expected.statistic)


def test_the_mean_of_a_methods_samples_is_not_another_method():
    """'demist-mean3' holds demist's own samples: demist is tested against the best *other* method."""
    rows = per_session_table()
    rows += [{**row, "method": "good-mean3", "psnr": row["psnr"] + 0.1} for row in rows if row["method"] == "good"]
    tests = paired_tests(rows, metrics=("psnr",))["psnr"]
    assert tests["good"]["vs"] in {"ok", "tie"} and tests["good-mean3"]["vs"] in {"ok", "tie"}
    assert tests["ok"]["vs"] == "good-mean3"
    alone = [row for row in rows if row["method"].startswith("good")]  # one method and its mean: nothing to test
    assert paired_tests(alone, metrics=("psnr",)) == {}


def test_summary_writers(tmp_path):
    rows = per_session_table()
    summary, tests = summarise_folds(rows, ("psnr", "mse")), paired_tests(rows, ("psnr", "mse"))
    table = summary_markdown(summary, tests)
    good_line = next(line for line in table.splitlines() if line.startswith("| good "))
    assert good_line.count("*") == 2 and "±" in good_line
    assert "PSNR ↑" in table and "MSE ↓" in table
    write_summary_markdown(tmp_path / "summary.md", summary, tests)
    assert (tmp_path / "summary.md").read_text() == table
    with open(write_summary_csv(tmp_path / "summary.csv", summary, tests)) as fh:
        records = list(csv.DictReader(fh))
    assert len(records) == 6
    first = next(r for r in records if r["method"] == "good" and r["metric"] == "psnr")
    assert float(first["mean"]) == pytest.approx(summary["good"]["psnr"]["mean"]) and first["significant"] == "True"


def test_bad_tables_raise():
    with pytest.raises(DemistError):
        summarise_folds([])
    with pytest.raises(DemistError):
        summarise_folds([{"method": "a", "fold": 0, "subject": "s", "session": "1"}], metrics=("psnr",))
    row = {"method": "a", "fold": 0, "subject": "s", "session": "1", "psnr": 20.0}
    with pytest.raises(DemistError):
        paired_tests([row, dict(row)], metrics=("psnr",))


def test_session_summary_is_mean_and_sd_across_sessions():
    rows = per_session_table()
    summary = summarise_sessions(rows, metrics=("psnr", "mse"))
    good = [r["psnr"] for r in rows if r["method"] == "good"]
    assert summary["good"]["psnr"] == pytest.approx({"mean": np.mean(good), "sd": np.std(good, ddof=1),
                                                     "n_sessions": 12})
    assert "n_folds" not in summary["good"]["psnr"]
    # no fold column needed; an exact prediction gives an infinite mean, and one session an undefined SD
    exact = [{"method": "m", "subject": "s", "session": str(i), "psnr": math.inf} for i in range(2)]
    assert summarise_sessions(exact, ("psnr",))["m"]["psnr"]["mean"] == math.inf
    single = summarise_sessions(exact[:1], ("psnr",))["m"]["psnr"]
    assert math.isnan(single["sd"]) and single["n_sessions"] == 1
    table = summary_markdown(summary, paired_tests(rows, ("psnr", "mse")), across="sessions")
    assert "Mean ± SD across sessions." in table and "across folds" not in table


def test_an_undefined_metric_prints_a_dash_not_nan():
    rows = per_session_table()
    for row in rows:
        if row["method"] == "tie":
            row["psnr"] = float("nan")  # e.g. NCC of a constant map
    table = summary_markdown(summarise_folds(rows, ("psnr", "mse")), paired_tests(rows, ("psnr", "mse")))
    tie_line = next(line for line in table.splitlines() if line.startswith("| tie "))
    assert "| — |" in tie_line and "nan" not in table
