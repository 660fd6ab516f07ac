"""A batch over sessions — resumable, one failure never stops it — what it did, and its CSV log (synthesis and
preprocessing share all three)."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from tqdm.auto import tqdm

from demist.atomic import atomic_write
from demist.errors import DemistError

log = logging.getLogger(__name__)
Item = TypeVar("Item")


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


def run_batch(items: Sequence[Item], key: Callable[[Item], str], done: Callable[[Item], bool],
              work: Callable[[Item], None], summary: BatchSummary, desc: str, progress: bool = True) -> BatchSummary:
    """Run `work` on every item that is not `done` yet, recording each in `summary` under `key(item)`.

    A session's failure is recorded with its one-line reason and the batch goes on: a DemistError (bad input) as it
    is, any other exception (a tool's own failure on one scan) with its type, and its traceback in the log. Outputs
    are written atomically by `work`, so an interrupted batch resumes where it stopped.
    """
    for item in tqdm(items, desc=desc, unit="session", disable=not progress):
        name = key(item)
        if done(item):
            summary.skipped.append(name)
            continue
        try:
            work(item)
        except DemistError as exc:
            log.error("session %s: %s", name, exc)
            summary.failed[name] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - one session's failure must not stop the batch
            log.exception("session %s failed", name)
            summary.failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            continue
        summary.written.append(name)
    return summary
