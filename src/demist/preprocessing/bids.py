"""BIDS in and out: the T1w and FLAIR of every session of a BIDS dataset (read with pybids), and demist's outputs as
a BIDS derivative dataset, `derivatives/demist/`.

Choosing among several runs: when a session holds more than one T1w (or FLAIR), the one with the highest `run`
number is used (a repeated acquisition normally replaces a failed one); files without a run number count as run 0,
and ties are broken by file name. The choice and the alternatives are logged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from demist.atomic import atomic_write
from demist.errors import DemistError
from demist.preprocessing.session import SessionFiles
from demist.version import __version__

log = logging.getLogger(__name__)

DERIVATIVE = Path("derivatives") / "demist"
NO_SESSION = "none"
PREPROC_T1W = "_desc-preproc_T1w.nii.gz"  # the manifest's session label for a dataset without sessions


@dataclass(frozen=True)
class BidsSession:
    subject: str  # the label, without "sub-"
    session: str | None  # the label, without "ses-"; None when the dataset has no sessions
    t1w: Path
    flair: Path

    @property
    def prefix(self) -> str:
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def manifest_labels(self) -> tuple[str, str]:
        return f"sub-{self.subject}", f"ses-{self.session}" if self.session else NO_SESSION

    def folder(self, derivative: Path) -> Path:
        folder = derivative / f"sub-{self.subject}"
        return (folder / f"ses-{self.session}" if self.session else folder) / "anat"

    def files(self, derivative: Path) -> SessionFiles:
        """The preprocessing outputs under BIDS derivative names."""
        base = self.folder(derivative) / self.prefix
        return SessionFiles(t1w=Path(f"{base}{PREPROC_T1W}"),
                            flair=Path(f"{base}_space-T1w_desc-preproc_FLAIR.nii.gz"),
                            brain_mask=Path(f"{base}_desc-brain_mask.nii.gz"),
                            transform=Path(f"{base}_from-FLAIR_to-T1w_mode-image_xfm.json"))



def find_sessions(root: Path) -> tuple[list[BidsSession], dict[str, str]]:
    """Every (subject, session) of a BIDS dataset with both a T1w and a FLAIR, and the incomplete ones (manifest
    key → what is missing), which a batch reports and skips."""
    try:
        from bids import BIDSLayout
    except ImportError as exc:
        raise DemistError("pybids is not installed; BIDS input needs the extra: pip install 'demist[preprocess]'") \
            from exc
    root = Path(root).resolve()
    if not (root / "dataset_description.json").is_file():
        raise DemistError(f"--bids {root}: no dataset_description.json; expected the root of a BIDS dataset")
    layout = BIDSLayout(str(root), validate=False)
    found: dict[tuple[str, str | None], dict[str, list]] = {}
    for suffix in ("T1w", "FLAIR"):
        for image in layout.get(suffix=suffix, datatype="anat", extension=[".nii", ".nii.gz"]):
            if "derivatives" in Path(image.path).relative_to(root.resolve()).parts:
                continue  # never our own (or anyone's) derived images
            key = (image.entities["subject"], image.entities.get("session"))
            found.setdefault(key, {"T1w": [], "FLAIR": []})[suffix].append(image)
    sessions, incomplete = [], {}
    for (subject, session), images in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        where = f"sub-{subject}" + (f"/ses-{session}" if session else "")
        if not images["T1w"] or not images["FLAIR"]:
            missing = "T1w" if not images["T1w"] else "FLAIR"
            log.warning("%s: skipped, no %s", where, missing)
            incomplete[f"sub-{subject}/" + (f"ses-{session}" if session else NO_SESSION)] = \
                f"no *_{missing}.nii[.gz] in its anat/ folder"
            continue
        sessions.append(BidsSession(subject, session, _choose(images["T1w"], where), _choose(images["FLAIR"], where)))
    if not sessions:
        raise DemistError(f"--bids {root}: no session with both a *_T1w.nii[.gz] and a *_FLAIR.nii[.gz] under anat/")
    return sessions, incomplete


def _choose(images: list, where: str) -> Path:
    ranked = sorted(images, key=lambda im: (int(im.entities.get("run", 0) or 0), Path(im.path).name))
    if len(ranked) > 1:
        log.info("%s: %d candidates, using %s (highest run); not used: %s", where, len(ranked),
                 Path(ranked[-1].path).name, ", ".join(Path(im.path).name for im in ranked[:-1]))
    return Path(ranked[-1].path)


def psr_map_beside(preprocessed_t1w: Path) -> Path:
    """The PSR map's derivative name, beside the preprocessed T1w of the same session."""
    if not preprocessed_t1w.name.endswith(PREPROC_T1W):
        raise DemistError(f"t1w {preprocessed_t1w}: not a preprocessed T1w of the derivative; expected a name ending "
                          f"in {PREPROC_T1W} (as `demist preprocess --bids` writes)")
    return preprocessed_t1w.parent / (preprocessed_t1w.name.removesuffix(PREPROC_T1W) + "_desc-demist_PSRmap.nii.gz")


def write_dataset_description(derivative: Path) -> Path:
    """The derivative dataset's `dataset_description.json` (BIDS 1.9)."""
    derivative.mkdir(parents=True, exist_ok=True)
    content = {"Name": "demist: preprocessed T1w and FLAIR, and synthesized PSR maps", "BIDSVersion": "1.9.0",
               "DatasetType": "derivative",
               "GeneratedBy": [{"Name": "demist", "Version": __version__,
                                "Description": "N4 (ANTsPy), deepbet brain extraction, FLAIR->T1w rigid "
                                               "registration (ANTsPy); DEMIST PSR synthesis"}]}
    return atomic_write(derivative / "dataset_description.json", json.dumps(content, indent=1) + "\n")


def psr_sidecar(psr_map: Path) -> Path:
    """Where the JSON sidecar of a PSR map goes."""
    return Path(str(psr_map).removesuffix(".nii.gz") + ".json")


def write_psr_sidecar(psr_map: Path, model_run: Path, sampler: str, steps: int, samples: int) -> Path:
    """The JSON sidecar of a synthesized PSR map: which model, which demist, which sampler."""
    sidecar = psr_sidecar(psr_map)
    content = {"Description": "PSR (macromolecular pool-size ratio) synthesized from T1w + FLAIR by DEMIST",
               "Units": "ratio", "ModelRun": str(Path(model_run).resolve()), "DemistVersion": __version__,
               "Sampler": sampler, "SamplingSteps": steps, "SamplesAveraged": samples}
    return atomic_write(sidecar, json.dumps(content, indent=1) + "\n")
