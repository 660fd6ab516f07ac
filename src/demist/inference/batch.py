"""Synthesis over a whole manifest: `OUT/<subject>/<session>/psr.nii.gz`, resumable, one failure never stops it.

Under `accelerate launch` or `torchrun` (`synthesize_manifest_distributed`), each process takes every N-th session of
the manifest; the summaries are gathered, so every process knows the whole outcome, and the main one writes the log
`OUT/synthesis_log.csv`. Sessions are seeded by themselves, not by the process, so the outputs and the log are those
of a single-process run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from demist.batch_log import BatchSummary, run_batch, write_batch_log
from demist.data.manifest import SessionRecord, load_manifest, prediction_path
from demist.errors import DemistError
from demist.inference.base import Synthesizer
from demist.inference.pipeline import synthesize_files

LOG_NAME = "synthesis_log.csv"


def synthesize_manifest(
    synthesizer: Synthesizer,
    manifest: Path,
    out_dir: Path,
    samples: int = 1,
    seed: int = 0,
    sessions: Sequence[str] | None = None,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> BatchSummary:
    """Synthesize every session of `manifest` (or the given "subject/session" keys) that has no output yet.

    A session that fails is recorded with its one-line reason and the batch goes on; outputs are atomic, so an
    interrupted batch resumes where it stopped. `shard` = (i, n): only every n-th session from the i-th.
    """
    records = load_manifest(manifest, require=(), check_files=False)  # an incomplete row fails its session only
    if sessions is not None:
        wanted = set(sessions)
        records = [r for r in records if r.key in wanted]
        if not records:
            raise DemistError(f"manifest {manifest}: none of the requested sessions is in it")
    index, count = shard
    records = records[index::count]
    return run_batch(
        records, key=lambda r: r.key, done=lambda r: prediction_path(out_dir, r).exists(),
        work=lambda r: _synthesize_session(synthesizer, r, out_dir, samples, seed),
        summary=BatchSummary(), desc="sessions", progress=progress)


def _synthesize_session(synthesizer: Synthesizer, record: SessionRecord, out_dir: Path, samples: int,
                        seed: int) -> None:
    record.require("t1w", "flair")
    record.require_present("brain_mask")
    # overwrite: the session is not done (no map), so a std map there is left from an interrupted run
    synthesize_files(synthesizer, record.t1w, record.flair, prediction_path(out_dir, record),
                     mask=record.brain_mask, samples=samples, seed=seed, overwrite=True, progress=False)


def synthesize_manifest_distributed(synthesizer: Synthesizer, manifest: Path, out_dir: Path, samples: int = 1,
                                    seed: int = 0, progress: bool = True, cpu: bool = False) -> BatchSummary:
    """`synthesize_manifest` over every process of a launch (one process: the plain batch), then the merged summary
    in manifest order on every process, and `OUT/synthesis_log.csv` (session, status, reason) from the main one.
    `cpu`: the processes compute on the CPU (they join a gloo process group instead of NCCL)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState(cpu=cpu)
    own = synthesize_manifest(synthesizer, manifest, out_dir, samples=samples, seed=seed,
                              progress=progress and state.is_local_main_process,
                              shard=(state.process_index, state.num_processes))
    parts = gather_object([own]) if state.num_processes > 1 else [own]
    order = {record.key: i for i, record in enumerate(load_manifest(manifest, require=(), check_files=False))}
    merged = BatchSummary(
        written=sorted((k for p in parts for k in p.written), key=order.__getitem__),
        skipped=sorted((k for p in parts for k in p.skipped), key=order.__getitem__),
        failed=dict(sorted(((k, v) for p in parts for k, v in p.failed.items()), key=lambda kv: order[kv[0]])))
    if state.is_main_process:
        write_batch_log(out_dir / LOG_NAME, merged, list(order))
    state.wait_for_everyone()
    return merged
