"""Summaries across folds or sessions, and paired significance tests.

Data shape: a *per-session table* is a list of dicts, one per (method, held-out session), with keys
`method`, `subject`, `session` (plus `fold` for cross-validation) and one float per metric (e.g. `psnr`, `ssim`,
`mse`, `l1`, `ncc` from `image_metrics`). A summary is `{method: {metric: {"mean", "sd", "n_sessions", ...}}}`
(`n_folds` too for cross-validation); paired tests are
`{metric: {method: {"vs", "t", "p", "n", "n_sessions", "significant"}}}`.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import ttest_rel

from demist.atomic import atomic_write
from demist.errors import DemistError
from demist.evaluation.metrics import HIGHER_IS_BETTER, METRICS
from demist.inference.base import row_source

ROW_KEYS = ("method", "fold", "subject", "session")
SESSION_KEYS = ("method", "subject", "session")

Summary = dict[str, dict[str, dict[str, float]]]
Tests = dict[str, dict[str, dict[str, object]]]


def _metric_values(
    per_session: Sequence[Mapping[str, object]], metrics: Sequence[str], keys: Sequence[str] = ROW_KEYS
) -> dict[str, dict[tuple[str, str], dict[str, object]]]:
    """{method: {(subject, session): row}}, after checking every row has the keys it needs."""
    if not per_session:
        raise DemistError("per-session table: empty; expected one row per method and held-out session")
    by_method: dict[str, dict[tuple[str, str], dict[str, object]]] = defaultdict(dict)
    for row in per_session:
        missing = [key for key in (*keys, *metrics) if key not in row]
        if missing:
            raise DemistError(
                f"per-session table row {dict(row)}: missing {', '.join(missing)}; "
                f"expected {', '.join((*keys, *metrics))}"
            )
        key = (str(row["subject"]), str(row["session"]))
        if key in by_method[str(row["method"])]:
            raise DemistError(
                f"per-session table: method {row['method']} has session {key[0]}/{key[1]} twice; expected once"
            )
        by_method[str(row["method"])][key] = dict(row)
    return by_method


def summarise_folds(per_session: Sequence[Mapping[str, object]], metrics: Sequence[str] = METRICS) -> Summary:
    """Mean ± SD across folds of each fold's mean over its held-out sessions, per method and metric.

    SD uses ddof=1 (NaN with a single fold). `n_sessions` counts the sessions that entered the means.
    """
    summary: Summary = {}
    for method, rows in _metric_values(per_session, metrics).items():
        summary[method] = {}
        for metric in metrics:
            per_fold: dict[str, list[float]] = defaultdict(list)
            for row in rows.values():
                per_fold[str(row["fold"])].append(float(row[metric]))  # type: ignore[arg-type]
            fold_means = np.array([np.mean(values) for values in per_fold.values()])
            summary[method][metric] = {
                "mean": float(fold_means.mean()),
                "sd": float(fold_means.std(ddof=1)) if len(fold_means) > 1 else float("nan"),
                "n_folds": len(fold_means),
                "n_sessions": len(rows),
            }
    return summary


def summarise_sessions(per_session: Sequence[Mapping[str, object]], metrics: Sequence[str] = METRICS) -> Summary:
    """Mean ± SD across sessions, per method and metric (no folds: one evaluation of fixed predictions).

    SD uses ddof=1 (NaN with a single session); an infinite PSNR (an exact prediction) makes the mean infinite.
    """
    summary: Summary = {}
    for method, rows in _metric_values(per_session, metrics, SESSION_KEYS).items():
        summary[method] = {}
        for metric in metrics:
            values = np.array([float(row[metric]) for row in rows.values()])  # type: ignore[arg-type]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # inf − inf in the SD of exact predictions
                sd = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            summary[method][metric] = {"mean": float(values.mean()), "sd": sd, "n_sessions": len(values)}
    return summary


def _subject_means(rows: Mapping[tuple[str, str], Mapping[str, object]], keys: Sequence[tuple[str, str]],
                   metric: str) -> np.ndarray:
    """The metric averaged over each subject's sessions among `keys`, in the order of the subjects' first keys."""
    by_subject: dict[str, list[float]] = defaultdict(list)
    for subject, session in keys:
        by_subject[subject].append(float(rows[(subject, session)][metric]))  # type: ignore[arg-type]
    return np.array([np.mean(values) for values in by_subject.values()])


def paired_tests(
    per_session: Sequence[Mapping[str, object]], metrics: Sequence[str] = METRICS, alpha: float = 0.05
) -> Tests:
    """Paired t-test (`scipy.stats.ttest_rel`) of each method against the best *other* method, per metric.

    "Best" is the highest mean over held-out sessions for psnr/ssim/ncc and the lowest for mse/l1 (metrics not in
    `HIGHER_IS_BETTER` count as higher-is-better). A row holding the same method's samples (DEMIST and the mean of
    its samples, `demist-meanK`) is not "other". Pairs are subjects: over the sessions both methods scored, each
    subject's sessions are averaged first, because sessions of one subject share its anatomy and PSR level and are
    not independent (`n` counts subjects, `n_sessions` sessions). `significant` means significantly different from
    the method compared with (`vs`); read the direction from the sign of `t` (positive: better for psnr/ssim/ncc,
    worse for mse/l1). Empty when no two rows are of different methods.
    """
    by_method = _metric_values(per_session, metrics, SESSION_KEYS)
    if len({row_source(m) for m in by_method}) < 2:
        return {}
    tests: Tests = {}
    for metric in metrics:
        sign = 1.0 if HIGHER_IS_BETTER.get(metric, True) else -1.0
        score = {m: sign * np.mean([float(r[metric]) for r in rows.values()]) for m, rows in by_method.items()}
        tests[metric] = {}
        for method, rows in by_method.items():
            other = max((m for m in by_method if row_source(m) != row_source(method)), key=lambda m: score[m])
            shared = sorted(rows.keys() & by_method[other].keys())
            a = _subject_means(rows, shared, metric)
            b = _subject_means(by_method[other], shared, metric)
            t = p = float("nan")
            if len(a) >= 2 and np.all(np.isfinite(a - b)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # identical columns: t and p are NaN
                    t, p = (float(v) for v in ttest_rel(a, b))
            tests[metric][method] = {"vs": other, "t": t, "p": p, "n": len(a), "n_sessions": len(shared),
                                     "significant": bool(p < alpha)}
    return tests


def _cell(entry: Mapping[str, float], test: Mapping[str, object] | None, digits: int) -> str:
    if math.isinf(entry["mean"]):
        return "inf"
    if math.isnan(entry["mean"]):  # undefined for this method (NCC of a constant map)
        return "—"
    sd = "" if math.isnan(entry["sd"]) else f" ± {entry['sd']:.{digits}f}"
    star = "*" if test is not None and test.get("significant") else ""
    return f"{entry['mean']:.{digits}f}{sd}{star}"


def summary_markdown(
    summary: Summary, tests: Tests | None = None, digits: Mapping[str, int] | None = None, across: str = "folds"
) -> str:
    """A markdown table: one row per method, one column per metric, "mean ± SD" with * where p < alpha.

    `across` names what the SD runs over ("folds" for `summarise_folds`, "sessions" for `summarise_sessions`).
    """
    digits = {"psnr": 2, "psnr_centred": 2, "ssim": 4, "mse": 5, "l1": 4, "ncc": 4, **(digits or {})}
    metrics = list(next(iter(summary.values())).keys()) if summary else []
    arrows = {m: "↑" if HIGHER_IS_BETTER.get(m, True) else "↓" for m in metrics}
    lines = ["| method | " + " | ".join(f"{m.upper()} {arrows[m]}" for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for method, entries in summary.items():
        cells = [_cell(entries[m], (tests or {}).get(m, {}).get(method), digits.get(m, 4)) for m in metrics]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    footnote = f"\n\nMean ± SD across {across}."
    if tests:
        footnote += (" * p < 0.05, paired t-test against the best other method, over the subjects both scored "
                         "(each subject's sessions averaged).")
    return "\n".join(lines) + footnote + "\n"


def write_summary_markdown(path: str | Path, summary: Summary, tests: Tests | None = None) -> Path:
    """Write `summary_markdown` to `path` atomically."""
    return atomic_write(path, summary_markdown(summary, tests))


def write_summary_csv(path: str | Path, summary: Summary, tests: Tests | None = None) -> Path:
    """Long-format CSV: method, metric, mean, sd, n_folds, n_sessions, vs, n_subjects_tested, t, p, significant
    (test columns empty without `tests`). Written atomically."""
    columns = ["method", "metric", "mean", "sd", "n_folds", "n_sessions", "vs", "n_subjects_tested", "t", "p",
               "significant"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for method, entries in summary.items():
        for metric, entry in entries.items():
            test = (tests or {}).get(metric, {}).get(method, {})
            writer.writerow({"method": method, "metric": metric, **entry,
                             **{key: test.get(key, "") for key in ("vs", "t", "p", "significant")},
                             "n_subjects_tested": test.get("n", "")})
    return atomic_write(path, buf.getvalue())
