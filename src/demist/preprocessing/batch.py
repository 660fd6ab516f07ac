"""Preprocessing over a manifest (`OUT/<subject>/<session>/...`) or a BIDS dataset (`derivatives/demist/`), with
`manifest.csv` of the sessions done; resumable, and one failing session never stops the rest (its reason goes to
`preprocess_log.csv`)."""

from __future__ import annotations

from pathlib import Path

from demist.batch_log import BatchSummary, run_batch, write_batch_log
from demist.data.manifest import MANIFEST_NAME, SessionRecord, load_manifest, write_manifest
from demist.preprocessing.session import SessionFiles, preprocess_session

LOG_NAME = "preprocess_log.csv"
#: Columns carried over from the input manifest unchanged: they live on the T1w's grid, which preprocessing keeps.
CARRIED = ("psr", "lesion_mask", "wm_mask", "meta")


def preprocess_manifest(manifest: Path, out_dir: Path, device: str = "cpu",
                        progress: bool = True) -> tuple[BatchSummary, Path]:
    """Preprocess every session of `manifest` that is not done yet into `OUT/<subject>/<session>/`; returns the
    summary and the output manifest of the sessions done so far (`demist synthesize --manifest` takes it as is)."""
    out_dir = Path(out_dir).resolve()
    records = load_manifest(manifest, require=(), check_files=False)  # an incomplete row fails its session only
    jobs = [(r, SessionFiles.in_folder(out_dir / r.subject / r.session)) for r in records]
    return run_jobs(jobs, out_dir, device, progress)


def preprocess_bids(root: Path, device: str = "cpu", progress: bool = True) -> tuple[BatchSummary, Path]:
    """Preprocess every session of a BIDS dataset into `ROOT/derivatives/demist/` under BIDS derivative names."""
    from demist.preprocessing.bids import DERIVATIVE, find_sessions, write_dataset_description

    derivative = (Path(root) / DERIVATIVE).resolve()
    sessions, incomplete = find_sessions(root)
    jobs = []
    for session in sessions:
        subject, label = session.manifest_labels
        record = SessionRecord(subject=subject, session=label, group="unknown", t1w=session.t1w, flair=session.flair)
        jobs.append((record, session.files(derivative)))
    write_dataset_description(derivative)
    return run_jobs(jobs, derivative, device, progress, incomplete)


def run_jobs(jobs: list[tuple[SessionRecord, SessionFiles]], out_dir: Path, device: str, progress: bool,
             unusable: dict[str, str] | None = None) -> tuple[BatchSummary, Path]:
    """Preprocess each (session, its output files) not done yet; log to OUT/preprocess_log.csv (with the `unusable`
    sessions, key → reason, as failed) and list the sessions done in OUT/manifest.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = run_batch(
        jobs, key=lambda job: job[0].key, done=lambda job: job[1].done(),
        work=lambda job: _preprocess(job[0], job[1], device),
        summary=BatchSummary(verb="preprocessed", failed=dict(unusable or {})), desc="preprocessing",
        progress=progress)
    order = [r.key for r, _ in jobs]  # the manifest's order; BIDS sessions (sorted) interleave with the unusable ones
    write_batch_log(out_dir / LOG_NAME, summary, sorted(order + list(unusable)) if unusable else order)
    done = [(r, f) for r, f in jobs if f.done()]
    return summary, write_session_manifest(out_dir / MANIFEST_NAME, done)


def _preprocess(record: SessionRecord, files: SessionFiles, device: str) -> None:
    record.require("t1w", "flair")
    record.require_present(*CARRIED)  # the output manifest names the carried files: they must exist
    preprocess_session(record.t1w, record.flair, files, device=device, key=record.key)


def write_session_manifest(path: Path, sessions: list[tuple[SessionRecord, SessionFiles]]) -> Path:
    """A manifest of preprocessed sessions, paths relative to its folder."""
    base = path.parent.resolve()

    def rel(p: Path | None) -> str:
        if p is None:
            return ""
        p = Path(p).resolve()
        return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)

    rows = [{"subject": r.subject, "session": r.session, "group": r.group, "t1w": rel(f.t1w), "flair": rel(f.flair),
             "brain_mask": rel(f.brain_mask), **{c: rel(getattr(r, c)) for c in CARRIED}} for r, f in sessions]
    return write_manifest(path, rows)
