"""Synthesis over a whole manifest: `OUT/<subject>/<session>/psr.nii.gz`, resumable, one failure never stops it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from demist.data.manifest import load_manifest
from demist.errors import DemistError
from demist.inference.base import Synthesizer
from demist.inference.pipeline import synthesize_files

log = logging.getLogger(__name__)

OUTPUT_NAME = "psr.nii.gz"


@dataclass
class BatchSummary:
    """What a batch run did, session by session."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{len(self.written)} synthesized, {len(self.skipped)} already done, {len(self.failed)} failed"]
        lines += [f"  failed {key}: {why}" for key, why in self.failed.items()]
        return "\n".join(lines)


def output_path(out_dir: Path, subject: str, session: str) -> Path:
    """Where the batch form writes one session's PSR map."""
    return out_dir / subject / session / OUTPUT_NAME


def synthesize_manifest(
    synthesizer: Synthesizer,
    manifest: Path,
    out_dir: Path,
    samples: int = 1,
    seed: int = 0,
    sessions: Sequence[str] | None = None,
    progress: bool = True,
) -> BatchSummary:
    """Synthesize every session of `manifest` (or the given "subject/session" keys) that has no output yet.

    A session that fails is recorded with its one-line reason and the batch goes on; outputs are atomic, so an
    interrupted batch resumes where it stopped.
    """
    records = load_manifest(manifest)
    if sessions is not None:
        wanted = set(sessions)
        records = [r for r in records if r.key in wanted]
        if not records:
            raise DemistError(f"manifest {manifest}: none of the requested sessions is in it")
    summary = BatchSummary()
    for record in tqdm(records, desc="sessions", unit="session", disable=not progress):
        out = output_path(out_dir, record.subject, record.session)
        if out.exists():
            summary.skipped.append(record.key)
            continue
        try:
            synthesize_files(synthesizer, record.t1w, record.flair, out, mask=record.brain_mask, samples=samples,
                             seed=seed, progress=False)
        except DemistError as exc:
            log.error("session %s: %s", record.key, exc)
            summary.failed[record.key] = str(exc)
            continue
        summary.written.append(record.key)
    return summary
