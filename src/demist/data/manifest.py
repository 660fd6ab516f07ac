"""The manifest: demist's dataset format, one CSV row per imaging session.

Columns: `subject, session, group, t1w, flair, psr, brain_mask, lesion_mask` and optional `wm_mask` and `meta`
(a JSON file with lesion parameters and the mid-sagittal plane, as the synthetic cohort writes). Paths are
relative to the manifest's folder (absolute paths also work). `psr` and the masks may be empty for sessions that
only need synthesis; `t1w` and `flair` are always required.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from demist.atomic import atomic_write
from demist.errors import DemistError

REQUIRED_COLUMNS = ("subject", "session", "group", "t1w", "flair", "psr", "brain_mask", "lesion_mask")
OPTIONAL_COLUMNS = ("wm_mask", "meta")
MANIFEST_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
IMAGE_COLUMNS = ("t1w", "flair", "psr", "brain_mask", "lesion_mask", "wm_mask", "meta")
MANIFEST_NAME = "manifest.csv"  # the file name of every manifest demist writes
PREDICTION_NAME = "psr.nii.gz"  # a batch's PSR map of one session: <folder>/<subject>/<session>/psr.nii.gz
#: `group` values (any case) that name healthy controls; every other group is a patient group.
CONTROL_GROUPS = frozenset({"hc", "control", "controls", "healthy"})


@dataclass(frozen=True)
class SessionRecord:
    """One imaging session of the manifest, with absolute paths (None where the column is empty)."""

    subject: str
    session: str
    group: str
    t1w: Path
    flair: Path
    psr: Path | None = None
    brain_mask: Path | None = None
    lesion_mask: Path | None = None
    wm_mask: Path | None = None
    meta: Path | None = None

    @property
    def key(self) -> str:
        """`subject/session`, unique within a manifest."""
        return f"{self.subject}/{self.session}"

    @property
    def is_patient(self) -> bool:
        """True unless the session's group names healthy controls (`CONTROL_GROUPS`)."""
        return self.group.strip().lower() not in CONTROL_GROUPS

    def require(self, *columns: str) -> None:
        """Raise if any of `columns` is empty for this session, or names a file that does not exist."""
        missing = [c for c in columns if getattr(self, c) is None]
        if missing:
            raise DemistError(f"manifest session {self.key}: column(s) {', '.join(missing)} empty; required here")
        for column in columns:
            if not Path(getattr(self, column)).exists():
                raise DemistError(f"manifest session {self.key}: {column} file {getattr(self, column)} not found; "
                                  "expected an existing file")

    def require_present(self, *columns: str) -> None:
        """Raise if any of `columns` that is filled names a file that does not exist (empty ones may stay empty)."""
        self.require(*[c for c in columns if getattr(self, c) is not None])


def check_folder_name(name: str, what: str) -> None:
    """A subject or session label names a folder of the outputs (<out>/<subject>/<session>/): one non-empty path
    component. `what` says where the label came from."""
    if not name or name in (".", "..") or any(c in name for c in "/\\"):
        raise DemistError(f"{what} {name!r}; expected a name without '/' or '\\' that is not empty, '.' or '..' "
                          "(outputs go to <out>/<subject>/<session>/)")


def prediction_path(folder: Path, record: SessionRecord) -> Path:
    """Where a batch writes, and the evaluation reads, one session's PSR map."""
    return Path(folder) / record.subject / record.session / PREDICTION_NAME


def write_manifest(path: str | Path, rows: Sequence[Mapping[str, str]]) -> Path:
    """Write rows (dicts keyed by column name) as a manifest CSV, atomically."""
    path = Path(path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(MANIFEST_COLUMNS), extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") or "" for c in MANIFEST_COLUMNS})
    atomic_write(path, buf.getvalue())
    return path


def load_manifest(path: str | Path, require: Sequence[str] = ("t1w", "flair"),
                  check_files: bool = True) -> list[SessionRecord]:
    """Read and check a manifest.

    Checks the header (every required column present, no unknown column), that each row's `require` columns are
    filled, that every named file exists, and that `subject/session` pairs are unique. Images themselves are
    checked when they are loaded. A batch passes `require=()` and `check_files=False` and calls
    `SessionRecord.require` per session, so that one incomplete row fails that session, not the batch.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "file not found"
        raise DemistError(f"manifest {path}: {problem}; expected a CSV with columns {', '.join(REQUIRED_COLUMNS)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DemistError(f"manifest {path}: not readable as UTF-8 text ({exc})") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DemistError(f"manifest {path}: missing column(s) {', '.join(missing)}; "
                          f"found {', '.join(header) or 'none'}")
    unknown = [c for c in header if c not in MANIFEST_COLUMNS]
    if unknown:
        raise DemistError(f"manifest {path}: unknown column(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(MANIFEST_COLUMNS)}")
    root = path.parent
    records: list[SessionRecord] = []
    seen: set[str] = set()
    for line, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        where = f"manifest {path}, line {line}"
        for column in ("subject", "session", "group", *require):
            if not row.get(column):
                raise DemistError(f"{where}: column {column} is empty; expected a value")
        for column in ("subject", "session"):
            check_folder_name(row[column], f"{where}: {column}")
        paths: dict[str, Path | None] = {}
        for column in IMAGE_COLUMNS:
            value = row.get(column, "")
            if not value:
                paths[column] = None
                continue
            file = (root / value).resolve() if not Path(value).is_absolute() else Path(value)
            if check_files and not file.exists():
                raise DemistError(f"{where}: {column} file {file} not found; expected an existing file")
            paths[column] = file
        record = SessionRecord(subject=row["subject"], session=row["session"], group=row["group"], **paths)
        if record.key in seen:
            raise DemistError(f"{where}: session {record.key} appears twice; expected one row per session")
        seen.add(record.key)
        records.append(record)
    if not records:
        raise DemistError(f"manifest {path}: has no sessions; expected at least one row")
    return records


def subjects_of(records: Sequence[SessionRecord]) -> list[str]:
    """The distinct subjects, in manifest order."""
    return list(dict.fromkeys(r.subject for r in records))


def select_subjects(records: Sequence[SessionRecord], subjects: Sequence[str]) -> list[SessionRecord]:
    """The sessions of the given subjects (a cross-validation fold's training or test set)."""
    wanted = set(subjects)
    return [r for r in records if r.subject in wanted]


def training_records(manifest: str | Path, subjects: Sequence[str] | None = None) -> list[SessionRecord]:
    """The manifest's sessions with PSR, restricted to `subjects` (a cross-validation fold's training set)."""
    records = load_manifest(manifest, require=("t1w", "flair", "psr"))
    if subjects is None:
        return records
    known = set(subjects_of(records))
    unknown = [s for s in subjects if s not in known]
    if unknown:
        raise DemistError(f"subjects {', '.join(unknown)}: not in manifest {manifest}; expected some of "
                          f"{', '.join(sorted(known))}")
    chosen = select_subjects(records, subjects)
    if not chosen:
        raise DemistError(f"subjects: empty list; expected at least one training subject of manifest {manifest}")
    return chosen
