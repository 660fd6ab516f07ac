"""Writing a synthetic cohort: one folder per subject and session, NIfTI volumes, meta.json, and the manifest."""

from __future__ import annotations

import json
import logging
import re
import shutil
from numbers import Integral, Real
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from demist.atomic import atomic_write, check_output_folder
from demist.data.manifest import MANIFEST_NAME, write_manifest
from demist.data.nifti import save_image, scanner_image
from demist.data.phantom.metadata import session_metadata
from demist.data.phantom.render import render_session
from demist.data.phantom.subject import plan_subject, subject_fields
from demist.data.phantom.templates import load_template_anatomy
from demist.errors import DemistError

logger = logging.getLogger(__name__)

SPACING_RANGE_MM = (1.0, 4.0)
#: Written next to the manifest; marks the folder as a cohort demist may overwrite.
COHORT_MARKER = "cohort.json"
VOLUMES = ("t1w", "flair", "psr", "brain_mask", "lesion_mask", "wm_mask", "tissue_labels")
SUBJECT_DIR = re.compile(r"^sub-\d{3,}$")


def _check_arguments(out_dir: Path, n_subjects: int, spacing: float, seed: int) -> None:
    if isinstance(n_subjects, bool) or not isinstance(n_subjects, Integral) or n_subjects < 1:
        raise DemistError(f"n_subjects: {n_subjects!r}; expected an integer >= 1")
    if isinstance(spacing, bool) or not isinstance(spacing, Real) or not np.isfinite(spacing) \
            or not SPACING_RANGE_MM[0] <= float(spacing) <= SPACING_RANGE_MM[1]:
        raise DemistError(f"spacing: {spacing!r}; expected a voxel size in mm between "
                          f"{SPACING_RANGE_MM[0]:g} and {SPACING_RANGE_MM[1]:g} (1 or 2 are typical)")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise DemistError(f"seed: {seed!r}; expected an integer >= 0")
    check_output_folder(out_dir, "output folder", "a new or empty folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / COHORT_MARKER).is_file():
        raise DemistError(f"output folder {out_dir}: not empty and not a synthetic cohort; expected a new or "
                          f"empty folder, or one written by a previous generate_cohort")
    check_same_cohort(out_dir, n_subjects, spacing, seed)


def check_same_cohort(out_dir: Path, n_subjects: int, spacing: float, seed: int) -> None:
    """A cohort already in `out_dir` must be the one these settings generate: regenerating it is harmless, replacing
    another would leave the runs trained on it pointing at other data."""
    marker = Path(out_dir) / COHORT_MARKER
    if not marker.is_file():
        return
    try:
        old = json.loads(marker.read_text())
        same = (old["n_subjects"], float(old["spacing"]), old["seed"]) == (n_subjects, float(spacing), seed)
    except (ValueError, KeyError, TypeError):
        same = False
    if not same:
        raise DemistError(f"cohort folder {out_dir}: holds another synthetic cohort ({marker.read_text().strip()}); "
                          f"expected {n_subjects} subjects, spacing {float(spacing):g}, seed {seed}, or a new folder")


def _clear_previous_cohort(out_dir: Path) -> None:
    """Remove the subject folders of the cohort previously written here (the marker says the folder is ours)."""
    if not (out_dir / COHORT_MARKER).is_file():
        return
    for folder in sorted(out_dir.iterdir()):
        if folder.is_dir() and SUBJECT_DIR.match(folder.name):
            shutil.rmtree(folder)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)


#: A list of numbers as json.dumps(indent=...) lays it out (a raw newline never occurs inside a JSON string).
NUMBER_LIST = re.compile(r"\[\n\s*([-+0-9.eE,\s]+?)\s*\]")


def _write_json(path: Path, content: dict) -> None:
    """Indented JSON with lists of numbers kept on one line, written atomically."""
    text = NUMBER_LIST.sub(lambda m: "[" + ", ".join(p.strip() for p in m.group(1).split(",")) + "]",
                           json.dumps(content, indent=1))
    atomic_write(path, text + "\n")


def generate_cohort(out_dir: Path, n_subjects: int, spacing: float = 2.0, seed: int = 0,
                    progress: bool = True) -> Path:
    """Generate a synthetic MS cohort (MS:HC = 2:1, 1-3 sessions each) and return its manifest's path.

    Layout: ``out_dir/sub-001/ses-01/{t1w,flair,psr,brain_mask,lesion_mask,wm_mask,tissue_labels}.nii.gz`` and
    ``meta.json``; ``out_dir/manifest.csv``. The same seed gives the same bytes, and subject k does not depend
    on `n_subjects`.
    """
    out_dir = Path(out_dir)
    _check_arguments(out_dir, n_subjects, spacing, seed)
    spacing, seed, n_subjects = float(spacing), int(seed), int(n_subjects)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous_cohort(out_dir)
    _write_json(out_dir / COHORT_MARKER, {"generator": "demist.data.phantom", "n_subjects": n_subjects,
                                          "spacing": spacing, "seed": seed})
    anatomy = load_template_anatomy()
    rows: list[dict[str, str]] = []
    for index in tqdm(range(n_subjects), desc="synthetic subjects", unit="subject", disable=not progress):
        plan = plan_subject(seed, index, anatomy)
        fields = subject_fields(plan, anatomy)
        for session in range(plan.n_sessions):
            volumes = render_session(plan, fields, session, spacing, anatomy)
            meta = session_metadata(plan, session, spacing, volumes, anatomy)
            folder = out_dir / plan.subject_id / meta["session"]
            folder.mkdir(parents=True, exist_ok=True)
            for name in VOLUMES:
                data = volumes.images.get(name, volumes.masks.get(name))
                save_image(scanner_image(data, volumes.affine), folder / f"{name}.nii.gz")
            _write_json(folder / "meta.json", meta)
            relative = folder.relative_to(out_dir)
            rows.append({"subject": plan.subject_id, "session": meta["session"], "group": plan.group,
                         **{name: str(relative / f"{name}.nii.gz") for name in VOLUMES if name != "tissue_labels"},
                         "meta": str(relative / "meta.json")})
            logger.debug("%s/%s: %d lesions", plan.subject_id, meta["session"], len(meta["lesions"]))
    manifest = write_manifest(out_dir / MANIFEST_NAME, rows)
    logger.info("synthetic cohort: %d subjects, %d sessions at %g mm in %s", n_subjects, len(rows), spacing, out_dir)
    return manifest
