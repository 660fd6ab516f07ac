"""The files of an evaluation: per_session.csv, summary.json and report.md, each written atomically.

summary.json is strict JSON: values that are undefined or infinite (the SD of a single session, the PSNR of an
exact prediction) are written as null.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from demist.atomic import atomic_write
from demist.evaluation.inputs import OPTIONAL_MASKS, ORACLE
from demist.evaluation.lesions import MIN_BOOTSTRAP_PATIENTS, auc_text
from demist.evaluation.metrics import METRICS
from demist.evaluation.stats import summary_markdown

PER_SESSION_COLUMNS = ("method", "subject", "session", "group", *METRICS)


def write_per_session_csv(path: Path, rows: Sequence[Mapping[str, object]]) -> Path:
    """One row per (method, session) with the image metrics (full precision; `inf` for an exact PSNR)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(PER_SESSION_COLUMNS), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, buffer.getvalue())


def _strict_json(value: Any) -> Any:
    """`value` with numpy scalars made Python, tuples made lists and non-finite floats made None."""
    if isinstance(value, Mapping):
        return {str(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_summary_json(path: Path, summary: Mapping[str, Any]) -> Path:
    """`summary` as indented strict JSON."""
    return atomic_write(path, json.dumps(_strict_json(summary), indent=2, allow_nan=False) + "\n")


def _lesion_table(lesion: Mapping[str, Any]) -> list[str]:
    lines = [
        "| source | AUC vs pNAWM+dNAWM [95% CI] | Δ vs oracle | AUC vs pNAWM | AUC vs dNAWM "
        "| lesion bias (PSR) | contrast bias vs pNAWM |",
        "|---|---|---|---|---|---|---|",
    ]
    oracle_auc = lesion["auc"][ORACLE]["combined"]["auc"]
    for source, auc in lesion["auc"].items():
        bias = lesion["bias"].get(source)
        delta = "—" if source == ORACLE else f"{auc['combined']['auc'] - oracle_auc:+.3f}"
        bias_cells = ("—", "—") if bias is None else (f"{bias['lesion']:+.4f}", f"{bias['contrast_pnawm']:+.3f}")
        lines.append(f"| {source} | {auc_text(auc['combined'])} | {delta} | {auc_text(auc['pnawm'])} "
                     f"| {auc_text(auc['dnawm'])} | {bias_cells[0]} | {bias_cells[1]} |")
    return lines


def report_markdown(summary: Mapping[str, Any]) -> str:
    """A short human-readable report of `evaluate_predictions`' summary."""
    psr_range = summary["psr_range"]
    counts = summary["counts"]
    sessions = ", ".join(f"{m} {n}" for m, n in counts["sessions"].items())
    lines = [
        "# demist evaluation",
        "",
        f"Manifest: `{summary['manifest']}`. Sessions evaluated per method: {sessions} "
        f"({counts['subjects']} subjects).",
        "",
        *[f"- Not readable, {'lesion contrast' if source in OPTIONAL_MASKS else 'left'} out: {key} ({source}): {why}"
          for key, failed in counts.get("unreadable", {}).items() for source, why in failed.items()],
        *([""] if counts.get("unreadable") else []),
        "## Image similarity inside the brain mask",
        "",
        f"Metrics are computed on PSR divided by the fixed physical range {psr_range:g} (1.0 = PSR {psr_range:g}), "
        f"with data range {summary['data_range']:g}: one scale for every subject and method, never rescaled per "
        f"image. PSNR 30 dB ≙ RMSE {psr_range * 10 ** -1.5:.4f} PSR; MSE ×{psr_range ** 2:g} gives PSR². "
        "PSNR_CENTRED is the PSNR once each session's mean error inside the mask is removed: the map without the "
        "session's level.",
        "",
        summary_markdown(summary["metrics"], summary["paired_tests"] or None, across="sessions").rstrip(),
        "",
        "## Lesion contrast (lesion vs normal-appearing white matter)",
        "",
    ]
    lesion = summary["lesion_contrast"]
    dropped = summary["counts"].get("lesions_dropped", {})
    reasons = ", ".join(f"{n} with a {reason}" for reason, n in dropped.items())
    if lesion is None and dropped:
        lines.append(f"Not computed: every lesion was left out ({reasons}).")
    elif lesion is None:
        lines.append("Not computed: no patient session with lesions, a WM mask and every method's prediction.")
    else:
        left_out = f" ({sum(dropped.values())} more left out: {reasons})" if dropped else ""
        lines += [
            f"First session of each of {lesion['n_subjects']} patients, {lesion['n_lesions']} lesions{left_out}. "
            "Per lesion: mean PSR of the lesion, of its proximal NAWM (WM in a ring "
            f"{summary['ring_mm']:g} mm wide beyond a one-voxel margin around the lesions) and of its distal NAWM (the "
            "lesion mirrored across the mid-sagittal plane). AUC: the ROC of lesion against NAWM regions over all "
            "patients' lesions, i.e. the probability that a lesion's mean PSR is below a NAWM region's (its own or "
            f"another lesion's; 0.5 chance), 95% CI from {summary['bootstrap']} bootstrap resamples of patients, "
            f"each with all its lesions ([—]: none, with fewer than {MIN_BOOTSTRAP_PATIENTS} patients). The "
            "oracle is the true PSR map; a method above it separates lesions from NAWM more than the truth does. "
            "Bias: mean (prediction − truth) of lesion PSR, and of the relative contrast 1 − lesion/pNAWM "
            "(negative: lesions flattened).",
            "",
            *_lesion_table(lesion),
        ]
    figures = summary.get("figures", {})
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"- `{name}`: {caption}" for name, caption in figures.items()]
    return "\n".join(lines) + "\n"


def write_report(path: Path, summary: Mapping[str, Any]) -> Path:
    """Write `report_markdown(summary)`."""
    return atomic_write(path, report_markdown(summary))
