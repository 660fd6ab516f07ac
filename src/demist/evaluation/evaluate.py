"""Evaluate PSR predictions against a manifest's truth: image metrics, lesion contrast, report and figures.

For every session with a prediction: PSNR, SSIM, MSE, L1 and NCC inside the brain on PSR / `psr_range` (data
range 1). On the first session of each patient: per-lesion mean PSR of the lesion, its proximal and its distal
NAWM, for the truth (the oracle) and every method, pooled over patients into ROC AUCs with bootstrap CIs and a
lesion bias. Writes OUT/per_session.csv, summary.json, report.md, roc.png, qualitative.png and error_map.png.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from demist.atomic import check_output_folder
from demist.data.manifest import SessionRecord, load_manifest
from demist.data.space import load_on_grid, ras_view, ras_voxel, ras_voxel_size
from demist.errors import DemistError
from demist.evaluation.inputs import (
    ORACLE, TRUTH_FILES, TRUTH_GRID, SessionTruth, find_predictions, first_patient_sessions, load_prediction,
    load_truth, session_plane,
)
from demist.evaluation.lesions import (MIN_ROI_VOXELS, RING_MM, LesionROI, contrast_auc, lesion_bias, lesion_rois,
                                       roi_means)
from demist.evaluation.metrics import image_metrics
from demist.evaluation.report import write_per_session_csv, write_report, write_summary_json
from demist.evaluation.stats import paired_tests, summarise_sessions
from demist.inference.base import REFERENCES

logger = logging.getLogger(__name__)

DATA_RANGE = 1.0  # metrics run on PSR / psr_range, so the data range is 1 by construction
BOOTSTRAP_SEED = 0  # one seed for every source: all AUC CIs share the same patient resamples
ZOOM_HALF_WIDTH_MM = 24.0


@dataclass(frozen=True)
class FigureSession:
    """The session shown in the image figures and the voxel the views are centred on."""

    record: SessionRecord
    centre: tuple[int, int, int]
    lesion_voxels: int


def _check_arguments(psr_range: float, ring_mm: float, bootstrap: int) -> None:
    if not (isinstance(psr_range, (int, float)) and math.isfinite(psr_range) and psr_range > 0):
        raise DemistError(f"psr_range={psr_range!r}; expected a positive PSR value such as 0.25")
    if not (isinstance(ring_mm, (int, float)) and math.isfinite(ring_mm) and ring_mm > 0):
        raise DemistError(f"ring_mm={ring_mm!r}; expected a positive width in mm")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise DemistError(f"bootstrap={bootstrap!r}; expected an integer ≥ 0")


def _sessions_with_truth(records: list[SessionRecord], sessions: Sequence[str] | None) -> list[SessionRecord]:
    """The requested sessions (all by default) that have a true PSR map and a brain mask."""
    if sessions is not None:
        by_key = {r.key: r for r in records}
        unknown = [key for key in sessions if key not in by_key]
        if unknown:
            raise DemistError(f"sessions {unknown[:5]}: not in the manifest; expected \"subject/session\" keys")
        records = [by_key[key] for key in dict.fromkeys(sessions)]
        for record in records:
            record.require("psr", "brain_mask")
    without = [r.key for r in records if r.psr is None or r.brain_mask is None]
    if without:
        logger.warning("%d sessions have no psr or brain_mask in the manifest, skipped: %s", len(without),
                       ", ".join(without[:5]))
    kept = [r for r in records if r.psr is not None and r.brain_mask is not None]
    if not kept:
        raise DemistError("manifest: no session has both psr and brain_mask; expected sessions with a true PSR map")
    return kept


def _session_rois(truth: SessionTruth, ring_mm: float, drops: Counter) -> list[LesionROI]:
    """The lesion ROIs of a patient session; empty (and logged) when masks are missing or hold no lesion."""
    key = truth.record.key
    if truth.lesion is None or truth.wm is None:
        logger.warning("%s: no (readable) lesion_mask or wm_mask; left out of the lesion contrast", key)
        return []
    if not truth.lesion.any():
        logger.info("%s: the lesion mask is empty; no lesion contrast for this patient", key)
        return []
    return lesion_rois(truth.lesion, truth.wm, truth.affine, plane=session_plane(truth.record), ring_mm=ring_mm,
                       brain_mask=truth.brain, drops=drops)


def _view_centre(flat_indices: np.ndarray, shape: tuple[int, ...], affine: np.ndarray) -> tuple[int, int, int]:
    """Where to look at a region, in `ras_view` voxels: on the axial slice holding most of it, its voxel nearest to
    that slice's centroid (inside the region even when it is not convex, e.g. a confluent lesion)."""
    ijk = ras_voxel(np.stack(np.unravel_index(flat_indices, shape), axis=1), shape, affine)
    slices, counts = np.unique(ijk[:, 2], return_counts=True)
    on_slice = ijk[ijk[:, 2] == slices[np.argmax(counts)]]
    nearest = np.argmin(((on_slice - on_slice.mean(axis=0)) ** 2).sum(axis=1))
    return tuple(int(v) for v in on_slice[nearest])  # type: ignore[return-value]


def _load_session(record: SessionRecord, found: Mapping[str, Mapping[str, Path]],
                  unreadable: dict[str, dict[str, str]] | None,
                  lesion_contrast: bool) -> tuple[SessionTruth, dict[str, np.ndarray]] | None:
    """The session's truth (its lesion and WM masks only for the `lesion_contrast`) and every prediction that could
    be read. With `unreadable` (a dict to fill), a file that cannot be read is logged and recorded there, so it
    leaves one session (or one method's session, or one session's lesion contrast) out instead of the evaluation;
    without, its DemistError propagates."""
    bad_masks: dict[str, str] | None = None if unreadable is None else {}
    try:
        truth = load_truth(record, bad_masks, masks=lesion_contrast)
    except DemistError as exc:
        if unreadable is None:
            raise
        logger.error("%s: true maps not readable, session skipped: %s", record.key, exc)
        unreadable[record.key] = {TRUTH_FILES: str(exc)}
        return None
    if bad_masks and unreadable is not None:  # the session is still scored, without its lesion contrast
        for column, why in bad_masks.items():
            logger.error("%s: %s not readable, left out of the lesion contrast: %s", record.key, column, why)
        unreadable.setdefault(record.key, {}).update(bad_masks)
    preds = {}
    for method, files in found.items():
        if record.key in files:
            try:
                preds[method] = load_prediction(files[record.key], truth, method)
            except DemistError as exc:
                if unreadable is None:
                    raise
                logger.error("%s: %s prediction not readable, skipped: %s", record.key, method, exc)
                unreadable.setdefault(record.key, {})[method] = str(exc)
    return truth, preds


def _failures_text(unreadable: Mapping[str, Mapping[str, str]]) -> str:
    """One line per unreadable file: "subject/session (source): reason"."""
    return "; ".join(f"{key} ({source}): {why}" for key, failed in unreadable.items() for source, why in failed.items())


def _lesion_summary(means: Mapping[str, list[np.ndarray]], keys: list[str], bootstrap: int) -> dict[str, Any] | None:
    """AUCs (with ROC points) of every source and the bias of every method, on ROI means pooled over patients."""
    if not keys:
        return None
    pooled = {source: np.concatenate(blocks) for source, blocks in means.items()}
    patients = np.repeat(keys, [len(block) for block in means[ORACLE]])  # one scored session per patient
    aucs = {source: contrast_auc(*values.T, n_boot=bootstrap, seed=BOOTSTRAP_SEED, patients=patients)
            for source, values in pooled.items()}
    bias = {source: lesion_bias(values, pooled[ORACLE]) for source, values in pooled.items() if source != ORACLE}
    return {"sessions": keys, "n_subjects": len(keys), "n_lesions": int(len(pooled[ORACLE])), "auc": aucs,
            "bias": bias}


def _write_figures(out: Path, shown: FigureSession | None, found: Mapping[str, Mapping[str, Path]],
                   lesion: Mapping[str, Any] | None) -> dict[str, str]:
    """roc.png, qualitative.png and error_map.png; returns {file name: caption} of those written."""
    from demist.evaluation.figures import plot_error_map, plot_qualitative, plot_roc

    captions: dict[str, str] = {}
    if lesion is not None:
        plot_roc(lesion["auc"], out / "roc.png")
        captions["roc.png"] = "ROC of per-lesion PSR, lesions vs NAWM, oracle and each method"
    else:
        logger.warning("no lesion ROIs: roc.png not drawn")
    if shown is None:
        logger.warning("no session has every method's prediction: qualitative.png and error_map.png not drawn")
        return captions
    record = shown.record
    try:  # the session's own files were read once already; the inputs shown beside them were not
        truth = load_truth(record, {})  # its lesion mask is only an outline on the figure: shown if readable
        t1w = load_on_grid(record.t1w, truth.image, f"{record.key} T1w", onto=TRUTH_GRID)
        flair = load_on_grid(record.flair, truth.image, f"{record.key} FLAIR", onto=TRUTH_GRID)
        preds = {method: load_prediction(files[record.key], truth, method) for method, files in found.items()}
    except DemistError as exc:
        logger.error("qualitative.png and error_map.png not drawn: %s", exc)
        return captions
    view = lambda volume: ras_view(volume, truth.affine)  # noqa: E731 - axial slices whatever the storage order
    zoom = max(4, int(round(ZOOM_HALF_WIDTH_MM / float(ras_voxel_size(truth.affine)[:2].mean()))))
    shown_preds = {method: view(pred) for method, pred in preds.items()}
    plot_qualitative(view(t1w), view(flair), view(truth.psr), shown_preds, shown.centre, out / "qualitative.png",
                     zoom_half_width=zoom, lesion_mask=None if truth.lesion is None else view(truth.lesion))
    plot_error_map(view(truth.psr), shown_preds, out / "error_map.png", mask=view(truth.brain),
                   slice_index=shown.centre[2])
    where = f"{record.key}, axial slice z={shown.centre[2]} of the volume turned to RAS"
    what = f"its largest lesion ({shown.lesion_voxels} voxels)" if shown.lesion_voxels else "the brain's centre"
    captions["qualitative.png"] = f"MPRAGE, FLAIR, true and predicted PSR through {what}: {where}"
    captions["error_map.png"] = f"prediction − truth (PSR) inside the brain: {where}"
    return captions


def evaluate_predictions(
    manifest: Path,
    predictions: dict[str, Path],
    out: Path,
    psr_range: float = 0.25,
    ring_mm: float = RING_MM,
    bootstrap: int = 1000,
    sessions: list[str] | None = None,
    progress: bool = True,
    skip_unreadable: bool = False,
) -> dict:
    """Score each method's PSR maps (`predictions`: method → folder of `<subject>/<session>/psr.nii.gz`) against
    the manifest's true PSR, write the evaluation files into `out` and return the summary: what summary.json
    holds (with NaN/inf kept as floats, and ROC points in the lesion AUC entries) plus "per_session", the rows of
    per_session.csv (method, subject, session, group and the metrics).

    `sessions` restricts the evaluation to "subject/session" keys. Sessions a method has no prediction for are
    logged and skipped. A file that cannot be read or placed on the truth's grid (a prediction that does not overlap
    it, a corrupt NIfTI) is a DemistError, unless `skip_unreadable`: then it leaves that session out for that method
    (for every method when it is the truth; an unreadable lesion or WM mask only leaves out the session's lesion
    contrast), and is listed under counts["unreadable"] and in the report. A method with no prediction at all or none
    readable, or a manifest session without psr/brain_mask among the requested ones, is a DemistError.
    """
    _check_arguments(psr_range, ring_mm, bootstrap)
    out = check_output_folder(out, "--out", "a folder for the evaluation's files")
    records = _sessions_with_truth(load_manifest(manifest), sessions)
    found = find_predictions(records, predictions)
    methods = list(found)
    evaluated = [r for r in records if any(r.key in files for files in found.values())]
    patient_firsts = first_patient_sessions(evaluated)
    lesion_keys = {r.key for r in patient_firsts if all(r.key in found[m] for m in methods)}
    for record in patient_firsts:
        if record.key not in lesion_keys:
            logger.warning("%s: not every method has a prediction; left out of the lesion contrast", record.key)

    rows: list[dict[str, Any]] = []
    means: dict[str, list[np.ndarray]] = {source: [] for source in (ORACLE, *methods)}
    used_lesion_keys: list[str] = []
    drops: Counter = Counter()  # lesions left out of the contrast, by the region that was too small
    shown: FigureSession | None = None
    unreadable: dict[str, dict[str, str]] = {}  # {"subject/session": {TRUTH_FILES, a method or a mask column: reason}}
    for record in tqdm(evaluated, desc="evaluating", unit="session", disable=not progress):
        loaded = _load_session(record, found, unreadable if skip_unreadable else None, record.key in lesion_keys)
        if loaded is None:
            continue
        truth, preds = loaded
        target = truth.psr / psr_range
        for method, pred in preds.items():
            scores = image_metrics(pred / psr_range, target, truth.brain, data_range=DATA_RANGE)
            rows.append({"method": method, "subject": record.subject, "session": record.session,
                         "group": record.group, **scores})
        complete = len(preds) == len(methods)
        if record.key in lesion_keys and not complete:
            logger.warning("%s: a prediction could not be read; left out of the lesion contrast", record.key)
        rois = _session_rois(truth, ring_mm, drops) if record.key in lesion_keys and complete else []
        if rois:
            used_lesion_keys.append(record.key)
            means[ORACLE].append(roi_means(truth.psr, rois))
            for method in methods:
                means[method].append(roi_means(preds[method], rois))
            largest = max(rois, key=lambda roi: roi.lesion.size)
            if shown is None or largest.lesion.size > shown.lesion_voxels:
                centre = _view_centre(largest.lesion, truth.psr.shape, truth.affine)
                shown = FigureSession(record, centre, int(largest.lesion.size))
        elif shown is None and complete:
            centre = _view_centre(np.flatnonzero(truth.brain), truth.psr.shape, truth.affine)
            shown = FigureSession(record, centre, 0)

    scored = {row["method"] for row in rows}
    unscored = [method for method in methods if method not in scored]
    if unscored:
        raise DemistError(f"{', '.join(unscored)}: no session could be scored ({_failures_text(unreadable)}); "
                          "expected readable true PSR maps and predictions")
    lesion = _lesion_summary(means, used_lesion_keys, bootstrap)
    compared = [r for r in rows if r["method"] not in REFERENCES]
    summary: dict[str, Any] = {
        "manifest": str(Path(manifest).resolve()),
        "psr_range": float(psr_range),
        "data_range": DATA_RANGE,
        "metric_scale": f"PSR / {psr_range:g} (fixed physical range), data range {DATA_RANGE:g}, inside the brain mask",
        "ring_mm": float(ring_mm),
        "bootstrap": bootstrap,
        "methods": {m: str(Path(predictions[m]).resolve()) for m in methods},
        "counts": {
            "sessions": {m: sum(r["method"] == m for r in rows) for m in methods},
            "subjects": len({r.subject for r in evaluated}),
            "skipped": {m: [r.key for r in records if r.key not in found[m]] for m in methods},
            "lesion_subjects": len(used_lesion_keys),
            "lesions": lesion["n_lesions"] if lesion else 0,
            "lesions_dropped": {f"{region} under {MIN_ROI_VOXELS} voxels": n for region, n in sorted(drops.items())},
            "unreadable": unreadable,
        },
        "metrics": summarise_sessions(rows),
        # reference rows (autoencoder ceiling, decoded condition) are diagnostics, never the "best method" to beat
        "paired_tests": paired_tests(compared) if compared else {},
        "lesion_contrast": lesion,
        "per_session": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    summary["figures"] = _write_figures(out, shown, found, lesion)
    write_per_session_csv(out / "per_session.csv", rows)
    write_summary_json(out / "summary.json", _for_json(summary))
    write_report(out / "report.md", summary)
    logger.info("evaluation of %s on %d sessions written to %s", ", ".join(methods), len(evaluated), out)
    return summary


def _for_json(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The summary without the per-session rows (in per_session.csv) and the ROC curves' fpr/tpr lists (in
    roc.png), so summary.json stays readable."""
    summary = {key: value for key, value in summary.items() if key != "per_session"}
    lesion = summary["lesion_contrast"]
    if lesion is None:
        return summary
    auc = {source: {"n_lesions": entry["n_lesions"],
                    **{region: {"auc": entry[region]["auc"], "ci95": entry[region]["ci95"]}
                       for region in ("pnawm", "dnawm", "combined")}}
           for source, entry in lesion["auc"].items()}
    return {**summary, "lesion_contrast": {**lesion, "auc": auc}}
