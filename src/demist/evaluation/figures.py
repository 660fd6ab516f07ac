"""Figures of an evaluation: ROC curves, a qualitative panel, error maps and training-loss curves.

Figures are built with `matplotlib.figure.Figure` (no pyplot, no global backend state; rendered by Agg) and
written as PNG through a temporary file. Volumes are (x, y, z) arrays in RAS orientation: axial slices are shown
with anterior up and the subject's right on the right (neurological convention).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from demist.atomic import atomic_write
from demist.errors import DemistError
from demist.evaluation.lesions import auc_text

logger = logging.getLogger(__name__)

ROC_STYLES = {"combined": "-", "pnawm": "--", "dnawm": ":"}
ROC_LABELS = {"combined": "lesion vs pNAWM+dNAWM", "pnawm": "lesion vs pNAWM", "dnawm": "lesion vs dNAWM"}


def _save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    path = atomic_write(path, buffer.getvalue())
    logger.info("wrote figure %s", path)
    return path


def plot_roc(curves: Mapping[str, Mapping[str, object]], path: str | Path) -> Path:
    """ROC curves of lesion-vs-NAWM contrast, one colour per method (e.g. "oracle", then each method).

    `curves` maps a name to a `contrast_auc` result. Solid: lesions vs both NAWM regions; dashed: vs pNAWM;
    dotted: vs dNAWM. The legend gives each method's combined AUC with its bootstrap 95 % CI.
    """
    if not curves:
        raise DemistError("plot_roc: no curves given; expected {method: contrast_auc result}")
    fig = Figure(figsize=(5.5, 5.0))
    ax = fig.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(curves))]
    method_handles = []
    for colour, (name, result) in zip(colours, curves.items()):
        for region, style in ROC_STYLES.items():
            entry = result[region]  # type: ignore[index]
            width = 1.8 if region == "combined" else 1.1
            ax.plot(entry["fpr"], entry["tpr"], linestyle=style, color=colour, linewidth=width)
        label = f"{name}: AUC {auc_text(result['combined'])}"  # type: ignore[index]
        method_handles.append(Line2D([], [], color=colour, label=label))
    ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8)
    style_handles = [Line2D([], [], color="0.3", linestyle=s, label=ROC_LABELS[r]) for r, s in ROC_STYLES.items()]
    ax.legend(handles=method_handles + style_handles, loc="lower right", fontsize=7, title="combined AUC [95% CI]",
              title_fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate (NAWM called lesion)",
           ylabel="true-positive rate (lesions)", title="Lesion contrast in PSR (per-lesion means)")
    ax.set_aspect("equal")
    return _save(fig, path)


def _axial(volume: np.ndarray, z: int) -> np.ndarray:
    """Axial slice as an image: rows = y (anterior up with origin="lower"), columns = x."""
    return np.asarray(volume)[:, :, z].T


def _window(image: np.ndarray) -> tuple[float, float]:
    values = image[np.isfinite(image) & (image != 0)]
    return (0.0, float(np.percentile(values, 99.5))) if values.size else (0.0, 1.0)


def _check_volumes(volumes: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
    shapes = {name: np.shape(v) for name, v in volumes.items()}
    first = next(iter(shapes.values()))
    if len(first) != 3 or any(s != first for s in shapes.values()):
        raise DemistError(f"figure: volume shapes {shapes}; expected 3D volumes of one shape")
    return first  # type: ignore[return-value]


def plot_qualitative(
    t1w: np.ndarray,
    flair: np.ndarray,
    truth: np.ndarray,
    preds: Mapping[str, np.ndarray],
    lesion_center: Sequence[int],
    path: str | Path,
    zoom_half_width: int = 16,
    psr_vmax: float | None = None,
    lesion_mask: np.ndarray | None = None,
) -> Path:
    """Axial slice through `lesion_center` (voxel x, y, z): MPRAGE, FLAIR, true PSR and each method's PSR.

    The second row zooms on a (2·`zoom_half_width`)-voxel square around the lesion (outlined in the first row),
    with the outline of `lesion_mask` (if given) drawn on every panel. All PSR panels share one colour scale, 0 to
    `psr_vmax` (default: the 99.5th percentile of the true slice).
    """
    masks = {} if lesion_mask is None else {"lesion_mask": lesion_mask}
    shape = _check_volumes({"t1w": t1w, "flair": flair, "truth": truth, **preds, **masks})
    centre = [int(round(c)) for c in lesion_center]
    if len(centre) != 3 or not all(0 <= c < n for c, n in zip(centre, shape)):
        raise DemistError(f"plot_qualitative: lesion_center {list(lesion_center)} outside the volume {shape}")
    x, y, z = centre
    panels = {"MPRAGE": _axial(t1w, z), "FLAIR": _axial(flair, z), "PSR truth": _axial(truth, z)}
    panels.update({name: _axial(v, z) for name, v in preds.items()})
    psr_window = (0.0, psr_vmax) if psr_vmax else _window(panels["PSR truth"])
    x0, x1 = max(x - zoom_half_width, 0), min(x + zoom_half_width, shape[0])
    y0, y1 = max(y - zoom_half_width, 0), min(y + zoom_half_width, shape[1])
    outline = None if lesion_mask is None else _axial(np.asarray(lesion_mask) > 0, z)[y0:y1, x0:x1]
    if outline is not None and not 0 < outline.sum() < outline.size:
        outline = None  # nothing to outline in the zoom
    fig = Figure(figsize=(2.2 * len(panels) + 0.8, 4.6), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False)
    for column, (title, image) in enumerate(panels.items()):
        is_psr = title not in ("MPRAGE", "FLAIR")
        vmin, vmax = psr_window if is_psr else _window(image)
        cmap = "magma" if is_psr else "gray"
        axes[0, column].imshow(image, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
        zoom_box = Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", linewidth=0.8)
        axes[0, column].add_patch(zoom_box)
        axes[0, column].set_title(title, fontsize=9)
        axes[1, column].imshow(image[y0:y1, x0:x1], origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
        if outline is not None:
            axes[1, column].contour(outline.astype(float), levels=[0.5], colors="cyan", linewidths=0.7)
        for ax in axes[:, column]:
            ax.set_axis_off()
    fig.colorbar(ScalarMappable(Normalize(*psr_window), "magma"), ax=axes.ravel().tolist(), fraction=0.03, label="PSR")
    zoom_note = "bottom: zoom, lesions outlined" if outline is not None else "bottom: zoom"
    fig.suptitle(f"axial slice z={z} through a lesion at voxel ({x}, {y}, {z}); {zoom_note}", fontsize=9)
    return _save(fig, path)


def plot_error_map(
    truth: np.ndarray,
    preds: Mapping[str, np.ndarray],
    path: str | Path,
    mask: np.ndarray | None = None,
    slice_index: int | None = None,
    vmax: float | None = None,
) -> Path:
    """Signed error (prediction − truth) of each method on one axial slice, inside `mask` if given.

    Red: overestimated PSR, blue: underestimated; one symmetric scale ±`vmax` for all methods (default: the
    99th percentile of |error| over the shown slices). Default slice: the middle of the mask (or the volume).
    """
    if not preds:
        raise DemistError("plot_error_map: no predictions given; expected {method: PSR volume}")
    shape = _check_volumes({"truth": truth, **preds, **({"mask": mask} if mask is not None else {})})
    inside = np.ones(shape, dtype=bool) if mask is None else np.asarray(mask) > 0
    if slice_index is None:
        occupied = np.flatnonzero(inside.any(axis=(0, 1)))
        slice_index = int(occupied[len(occupied) // 2]) if occupied.size else shape[2] // 2
    if not 0 <= slice_index < shape[2]:
        raise DemistError(f"plot_error_map: slice_index {slice_index} outside 0..{shape[2] - 1}")
    keep = _axial(inside, slice_index)
    true_slice = _axial(truth, slice_index)
    errors = {name: np.where(keep, _axial(p, slice_index) - true_slice, np.nan) for name, p in preds.items()}
    if vmax is None:
        magnitudes = np.abs(np.concatenate([e[np.isfinite(e)] for e in errors.values()]))
        vmax = float(np.percentile(magnitudes, 99)) if magnitudes.size and magnitudes.max() > 0 else 1.0
    fig = Figure(figsize=(2.4 * len(errors) + 0.8, 2.8), layout="constrained")
    axes = fig.subplots(1, len(errors), squeeze=False)[0]
    for ax, (name, error) in zip(axes, errors.items()):
        shown = ax.imshow(error, origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(f"{name}\nMAE {np.nanmean(np.abs(error)):.4f}", fontsize=8)
        ax.set_axis_off()
    fig.colorbar(shown, ax=axes.tolist(), fraction=0.04, label="prediction − truth")
    fig.suptitle(f"error, axial slice z={slice_index}", fontsize=9)
    return _save(fig, path)


def _read_losses(path: Path, key: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """(step, loss) pairs of a metrics.jsonl (the loss under `key`: the training loop logs each phase's loss under
    the phase's name); lines without both keys (e.g. evaluation records) are skipped."""
    if not path.is_file():
        raise DemistError(f"metrics log {path}: file not found; expected a metrics.jsonl written by training")
    lines = path.read_text(encoding="utf-8").splitlines()
    steps, losses = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a run stopped mid-write leaves a partial last line
                logger.warning("metrics log %s: ignoring the incomplete last line", path)
                continue
            raise DemistError(
                f"metrics log {path}, line {number}: not JSON; expected one JSON object per line"
            ) from None
        if isinstance(record, dict) and "step" in record and key in record:
            steps.append(float(record["step"]))
            losses.append(float(record[key]))
    if not steps:
        raise DemistError(f"metrics log {path}: no line has both 'step' and {key!r}; expected training records")
    return np.array(steps), np.array(losses)


def plot_loss_curves(metrics_jsonl_paths: Mapping[str, str | Path], path: str | Path, smooth: int = 1,
                     keys: Mapping[str, str] | None = None) -> Path:
    """Training loss against step for each run (name → metrics.jsonl), on a log scale when every loss is positive.

    `keys` names the logged loss of each run (default "loss"; the training loop logs a phase's loss under its name).
    `smooth` > 1 overlays a running mean over that many records on the raw (faint) curve.
    """
    if not metrics_jsonl_paths:
        raise DemistError("plot_loss_curves: no metrics logs given; expected {run name: metrics.jsonl}")
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.add_subplot()
    all_positive = True
    for index, (name, log_path) in enumerate(metrics_jsonl_paths.items()):
        steps, losses = _read_losses(Path(log_path), (keys or {}).get(name, "loss"))
        all_positive &= bool(np.all(losses > 0))
        colour = f"C{index % 10}"
        if smooth > 1 and len(losses) >= smooth:
            ax.plot(steps, losses, color=colour, alpha=0.25, linewidth=0.8)
            running = np.convolve(losses, np.ones(smooth) / smooth, mode="valid")
            ax.plot(steps[smooth - 1:], running, color=colour, label=name)
        else:
            ax.plot(steps, losses, color=colour, label=name)
    if all_positive:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
