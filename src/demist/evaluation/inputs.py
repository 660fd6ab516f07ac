"""What an evaluation reads: a manifest session's truth, and each method's prediction on the truth's grid.

Predictions follow the layout of `demist synthesize --manifest`: `<folder>/<subject>/<session>/psr.nii.gz`, in
PSR units. Every volume is brought onto the grid of the session's true PSR map (unchanged when the grids match,
resampled when they overlap, refused otherwise), so voxels compare one to one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np

from demist.data.manifest import PREDICTION_NAME, SessionRecord, prediction_path
from demist.data.nifti import load_image
from demist.data.space import load_on_grid
from demist.errors import DemistError
from demist.evaluation.lesions import Plane

logger = logging.getLogger(__name__)

ORACLE = "oracle"
"""The name under which the true PSR map enters the lesion-contrast comparison (reserved as a method name)."""
TRUTH_FILES = "true maps"
"""Where an evaluation lists an unreadable true PSR or brain mask, beside the methods' and the optional masks' names."""
OPTIONAL_MASKS = ("lesion_mask", "wm_mask")
TRUTH_GRID = "the true PSR map"  # the grid every evaluated volume is brought onto
RESERVED_NAMES = frozenset({ORACLE, TRUTH_FILES, *OPTIONAL_MASKS})


def find_predictions(
    records: Sequence[SessionRecord], predictions: Mapping[str, str | Path]
) -> dict[str, dict[str, Path]]:
    """{method: {"subject/session": prediction file}} over `records`.

    Sessions without a prediction are logged and left out; a method with none at all is a DemistError (most
    likely a wrong folder).
    """
    if not predictions:
        raise DemistError("predictions: none given; expected {method name: folder of <subject>/<session>/psr.nii.gz}")
    found: dict[str, dict[str, Path]] = {}
    for method, folder in predictions.items():
        folder = Path(folder)
        if not method or method in RESERVED_NAMES:
            raise DemistError(f"prediction method name {method!r}: empty or reserved; expected another name")
        if not folder.is_dir():
            raise DemistError(f"predictions of {method} {folder}: not a folder; expected the --out-dir of "
                              "`demist synthesize --manifest`")
        files = {r.key: prediction_path(folder, r) for r in records}
        found[method] = {key: path for key, path in files.items() if path.is_file()}
        missing = [key for key in files if key not in found[method]]
        if not found[method]:
            raise DemistError(
                f"predictions of {method} {folder}: none of the {len(files)} sessions has "
                f"<subject>/<session>/{PREDICTION_NAME} (e.g. {files[records[0].key]}); expected the layout of "
                "`demist synthesize --manifest`"
            )
        if missing:
            logger.warning("%s: no prediction for %d of %d sessions, skipped: %s%s", method, len(missing),
                           len(files), ", ".join(missing[:5]), " …" if len(missing) > 5 else "")
    return found


@dataclass(frozen=True)
class SessionTruth:
    """A session's true PSR map (the reference grid) and masks on that grid (lesion/wm None when not given)."""

    record: SessionRecord
    image: nib.Nifti1Image
    psr: np.ndarray
    brain: np.ndarray
    lesion: np.ndarray | None
    wm: np.ndarray | None

    @property
    def affine(self) -> np.ndarray:
        return self.image.affine


def load_truth(record: SessionRecord, unreadable_masks: dict[str, str] | None = None,
               masks: bool = True) -> SessionTruth:
    """The session's true PSR and brain mask (both required), and its lesion and WM masks if the manifest has them
    (unless `masks` is False: then they are not read, and are None).

    With `unreadable_masks` (a dict to fill), a lesion or WM mask that cannot be read is left out (None) and its
    reason recorded under its column, so the session's image metrics survive it; without, its DemistError propagates.
    """
    record.require("psr", "brain_mask")
    image = load_image(record.psr, f"{record.key} PSR")
    brain = load_on_grid(record.brain_mask, image, f"{record.key} brain mask", is_mask=True, onto=TRUTH_GRID)
    if not brain.any():
        raise DemistError(f"{record.key} brain mask {record.brain_mask}: empty on the PSR grid; expected the brain")
    optional: dict[str, np.ndarray | None] = {}
    for column in OPTIONAL_MASKS:
        path = getattr(record, column)
        try:
            optional[column] = (None if path is None or not masks
                                else load_on_grid(path, image, f"{record.key} {column}", is_mask=True, onto=TRUTH_GRID))
        except DemistError as exc:
            if unreadable_masks is None:
                raise
            unreadable_masks[column] = str(exc)
            optional[column] = None
    return SessionTruth(record, image, np.asarray(image.dataobj, dtype=np.float32), brain,
                        optional["lesion_mask"], optional["wm_mask"])


def load_prediction(path: Path, truth: SessionTruth, method: str) -> np.ndarray:
    """A method's PSR map for the session of `truth`, on the truth's grid (float32, PSR units)."""
    return load_on_grid(path, truth.image, f"{method} prediction for {truth.record.key}", onto=TRUTH_GRID,
                        brain=truth.brain)


def session_plane(record: SessionRecord) -> Plane | None:
    """The mid-sagittal plane stored in the session's meta.json ("midsagittal_plane"), or None if there is none."""
    if record.meta is None:
        return None
    try:
        meta = json.loads(record.meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DemistError(
            f"{record.key} meta {record.meta}: not readable as JSON ({exc}); expected a JSON object"
        ) from None
    plane = meta.get("midsagittal_plane") if isinstance(meta, dict) else None
    if plane is None:
        logger.info("%s: meta %s has no midsagittal_plane; estimating it from the brain mask", record.key, record.meta)
    return plane


def first_patient_sessions(records: Sequence[SessionRecord]) -> list[SessionRecord]:
    """The first session (in manifest order) of each patient subject among `records`."""
    first: dict[str, SessionRecord] = {}
    for record in records:
        if record.is_patient:
            first.setdefault(record.subject, record)
    return list(first.values())
