"""What a batch over a manifest did, session by session, and its CSV log (synthesis and preprocessing share it)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from demist.atomic import atomic_write


@dataclass
class BatchSummary:
    """What a batch run did, session by session."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    verb: str = "synthesized"  # what the batch did to a written session

    def __str__(self) -> str:
        lines = [f"{len(self.written)} {self.verb}, {len(self.skipped)} already done, {len(self.failed)} failed"]
        lines += [f"  failed {key}: {why}" for key, why in self.failed.items()]
        return "\n".join(lines)


def write_batch_log(path: Path, summary: BatchSummary, keys: Sequence[str]) -> Path:
    """One row per session of the batch, in manifest order: written, already done or failed (with the reason)."""
    status = {**{k: ("written", "") for k in summary.written}, **{k: ("already done", "") for k in summary.skipped},
              **{k: ("failed", why) for k, why in summary.failed.items()}}
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["session", "status", "reason"])
    writer.writerows([key, *status[key]] for key in keys if key in status)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, text.getvalue())
