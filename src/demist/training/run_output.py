"""What every training entry point does around its loop: refuse to overwrite a finished run, tag the checkpoint
weights with the stage and config, record how the run was trained, and wait for every process of a multi-process
launch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from demist.atomic import check_output_folder
from demist.config import Config, config_to_dict
from demist.errors import DemistError
from demist.runs import METRICS_FILE, RUN_FILE, TENSORBOARD_DIR
from demist.training.checkpoint import CHECKPOINT_DIR


def check_out(out: Path, resume: bool) -> None:
    """`out` is a directory for a new run, or with `resume` an interrupted one; a finished run (its run.json) is never
    overwritten, nor trained again (the runs built on it check its run.json)."""
    check_output_folder(out, "--out", "a directory for the run")
    foreign = sorted(p.name for p in out.iterdir() if not _run_content(p)) if out.is_dir() else []
    if foreign:
        raise DemistError(f"--out {out}: holds files that are not a demist run's ({', '.join(foreign[:3])}"
                          f"{', …' if len(foreign) > 3 else ''}); expected a new or empty directory, or an interrupted "
                          "run to --resume")
    if (out / RUN_FILE).exists():
        if resume:
            raise DemistError(f"--out {out}: already holds a finished run, which --resume would train again; use it "
                              "as it is, or choose another directory")
        raise DemistError(f"--out {out}: already holds a finished run; choose another directory (or --resume an "
                          "interrupted one)")


def _run_content(path: Path) -> bool:
    """Whether `path`, inside a run directory, is something a demist training writes there: its record, weights,
    checkpoints, metrics log, a temporary file of an atomic write, or a sub-run (Stage 1 keeps its autoencoders'
    runs inside its own)."""
    if path.is_dir():
        return path.name in (CHECKPOINT_DIR, TENSORBOARD_DIR) or all(_run_content(p) for p in path.iterdir())
    return (path.name in (RUN_FILE, METRICS_FILE) or path.name.endswith(".safetensors")
            or (path.name.startswith(".") and ".tmp" in path.name))


def weights_metadata(cfg: Config, stage: str, data: str | None = None) -> dict[str, str]:
    """The metadata stored with checkpoint weights: the stage, its whole config and, when given, what it trains on
    (`data_fingerprint`), so that a resume with other sessions or parents is refused."""
    metadata = {"config": json.dumps(config_to_dict(cfg), sort_keys=True), "stage": stage}
    return metadata if data is None else {**metadata, "data": data}


def data_fingerprint(sessions: Sequence[Any], *parents: Any) -> str:
    """A digest of what a run trains on: its sessions' keys and the run.json digests of its parent runs (RunInfo;
    None for a parent it does not have)."""
    keys = sorted(str(s.key) for s in sessions)
    digests = [p.run_json_sha256 for p in parents if p is not None]
    return hashlib.sha256(json.dumps([keys, digests]).encode()).hexdigest()


def training_record(result: Any, sessions: Sequence[Any], manifest: str | Path | None = None,
                    subjects: Sequence[str] | None = None, **extra: Any) -> dict[str, Any]:
    """run.json's "training" entry: how the loop ran (`result`: its TrainResult), on which sessions, from which
    manifest and subjects (when given), and whatever the stage adds."""
    record: dict[str, Any] = {"steps": result.steps, "processes": result.processes,
                              "mixed_precision": result.mixed_precision, "device": result.device,
                              "sessions": [s.key for s in sessions]}
    if manifest is not None:
        record.update(subjects=list(subjects or []) or None, manifest=str(Path(manifest).resolve()))
    return {**record, **extra}


def barrier() -> None:
    """All processes of a multi-process launch wait here (the main one may still be writing the run)."""
    from accelerate import PartialState

    PartialState().wait_for_everyone()
