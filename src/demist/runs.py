"""Run directories: what a training command leaves behind, and what later commands read.

A run directory holds one safetensors file per component and `run.json`, written last, that names them with their
sha256, the resolved config, the parent runs (with the sha256 of their `run.json`) and the facts every later
command needs (spacing, psr_range, latent scale factor, prediction target). `read_run` refuses a directory
without `run.json` (training did not finish), with a file whose hash differs (changed after training), or written
by an incompatible format version. The layout is documented in docs/run_directories.md.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from demist.version import __version__
from demist.atomic import atomic_path, atomic_write
from demist.config import Config, config_from_dict, config_to_dict
from demist.errors import DemistError

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"  # the training loop's log of losses and evaluations, one JSON record per line
TENSORBOARD_DIR = "tensorboard"  # the same log for TensorBoard, where the config asks for it
RUN_FORMAT = "demist-run"
RUN_FORMAT_VERSION = 1
WEIGHTS_FORMAT = "demist-weights"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of a state dict's names, dtypes, shapes and values: the same weights give the same digest whatever
    file (and file metadata) they were saved in."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_weights(path: str | Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """Write a state dict as safetensors (atomically) with string `metadata`; returns the file's sha256."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata))
        digest = sha256_file(tmp)
    return digest


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: (state dict on the CPU, metadata)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except FileNotFoundError:
        raise DemistError(f"{path}: weights file not found") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: same meaning for the user
        raise DemistError(f"{path}: not a readable safetensors file ({exc}); "
                          "expected weights written by demist") from None


@dataclass(frozen=True)
class RunInfo:
    """A complete, verified run directory."""

    path: Path
    method: str  # "demist" or a baseline's name
    stage: str  # e.g. "autoencoder-psr", "autoencoder-cond", "stage1"
    config: Config
    components: dict[str, dict[str, str]]  # name -> {"file": ..., "sha256": ...}
    parents: dict[str, dict[str, str]]  # role -> {"path": ..., "sha256": sha256 of the parent's run.json}
    spacing: float
    psr_range: float
    latent_scale_factor: float | None = None
    prediction_type: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def weights(self, component: str) -> dict[str, torch.Tensor]:
        """The state dict of one component (already verified against its sha256)."""
        if component not in self.components:
            raise DemistError(f"run {self.path}: has no component {component!r}; it holds "
                              f"{', '.join(self.components)} (stage {self.stage})")
        return load_weights(self.path / self.components[component]["file"])[0]

    @property
    def run_json_sha256(self) -> str:
        return sha256_file(self.path / RUN_FILE)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write(path, json.dumps(payload, indent=2) + "\n")


def write_run(run_dir: str | Path, *, method: str, stage: str, config: Config,
              components: Mapping[str, Mapping[str, torch.Tensor]], parents: Mapping[str, RunInfo] | None = None,
              latent_scale_factor: float | None = None, prediction_type: str | None = None,
              training: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None) -> RunInfo:
    """Write each component's weights, then `run.json`; returns the run as `read_run` would."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(config_to_dict(config), sort_keys=True)
    entries = {}
    for name, state in components.items():
        file = f"{name}.safetensors"
        meta = {"format": WEIGHTS_FORMAT, "component": name, "stage": stage, "method": method, "config": config_json}
        entries[name] = {"file": file, "sha256": save_weights(run_dir / file, state, meta)}
    payload = {
        "format": RUN_FORMAT,
        "format_version": RUN_FORMAT_VERSION,
        "demist_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": method,
        "stage": stage,
        "spacing": config.data.spacing,
        "psr_range": config.data.psr_range,
        "latent_scale_factor": latent_scale_factor,
        "prediction_type": prediction_type,
        "components": entries,
        "parents": {role: {"path": str(p.path.resolve()), "stage": p.stage, "sha256": p.run_json_sha256}
                    for role, p in (parents or {}).items()},
        "training": dict(training or {}),
        "metrics": dict(metrics or {}),
        "config": config_to_dict(config),
    }
    _write_json(run_dir / RUN_FILE, payload)
    logger.info("run written: %s (%s)", run_dir, ", ".join(entries))
    return read_run(run_dir)


def read_run(run_dir: str | Path, stages: str | Sequence[str] | None = None, what: str = "run") -> RunInfo:
    """Read and verify a run directory; `stages` lists the stages the caller accepts.

    `what` names the argument in error messages (e.g. "--stage1").
    """
    run_dir = Path(run_dir)
    label = f"{what} {run_dir}"
    if not run_dir.is_dir():
        raise DemistError(f"{label}: not a directory; expected a run directory written by a demist training command")
    file = run_dir / RUN_FILE
    if not file.is_file():
        inner = [run_dir / name for name in ("stage1", "prior") if (run_dir / name / RUN_FILE).is_file()
                 or (run_dir / name / "prior.json").is_file()]
        if inner:  # the folder of `demist train stage1 --out` or `demist train prior --out`, not the run in it
            raise DemistError(f"{label}: holds no {RUN_FILE} itself; expected the run inside it, {inner[0]}")
        raise DemistError(f"{label}: incomplete, no {RUN_FILE} (training did not finish, or this is not a run "
                          "directory); finish it with --resume or pass a finished run")
    try:
        payload = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DemistError(f"{label}: {RUN_FILE} is not readable JSON ({exc}); "
                          "expected a file written by demist") from None
    if not isinstance(payload, dict) or payload.get("format") != RUN_FORMAT:
        raise DemistError(f"{label}: {RUN_FILE} is not a demist run description; expected format {RUN_FORMAT!r}")
    version = payload.get("format_version")
    if version != RUN_FORMAT_VERSION:
        raise DemistError(f"{label}: run format version {version!r} (demist {payload.get('demist_version')}); "
                          f"this demist reads version {RUN_FORMAT_VERSION}: retrain, or use the demist that wrote it")
    _check_fields(payload, label)
    wanted = (stages,) if isinstance(stages, str) else tuple(stages or ())
    if wanted and payload["stage"] not in wanted:
        raise DemistError(f"{label}: is a {payload['stage']!r} run; expected {' or '.join(map(repr, wanted))}")
    for name, entry in payload["components"].items():
        path = run_dir / entry["file"]
        if not path.is_file():
            raise DemistError(f"{label}: component {name} ({entry['file']}) is missing; the run is incomplete")
        if sha256_file(path) != entry["sha256"]:
            raise DemistError(f"{label}: {entry['file']} does not match the sha256 in {RUN_FILE} (changed or "
                              "corrupted after training); expected the file the training wrote")
    try:
        config = config_from_dict(payload["config"])
    except DemistError as exc:
        raise DemistError(f"{label}: its stored config does not fit this demist ({exc})") from None
    _warn_changed_parents(payload["parents"], label)
    return RunInfo(path=run_dir, method=payload["method"], stage=payload["stage"], config=config,
                   components=payload["components"], parents=payload["parents"], spacing=float(payload["spacing"]),
                   psr_range=float(payload["psr_range"]), latent_scale_factor=payload["latent_scale_factor"],
                   prediction_type=payload["prediction_type"], training=payload["training"],
                   metrics=payload["metrics"])


_FIELDS = {"method": str, "stage": str, "spacing": (int, float), "psr_range": (int, float), "components": dict,
           "parents": dict, "training": dict, "metrics": dict, "config": dict,
           "latent_scale_factor": (int, float, type(None)), "prediction_type": (str, type(None))}


def _check_fields(payload: Mapping[str, Any], label: str) -> None:
    for key, kind in _FIELDS.items():
        if key not in payload or not isinstance(payload[key], kind):
            raise DemistError(f"{label}: {RUN_FILE} key {key!r} is missing or of the wrong type; the file was edited "
                              "or truncated")
    for name, entry in payload["components"].items():
        file = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(file, str) or Path(file).name != file or not isinstance(entry.get("sha256"), str):
            raise DemistError(f"{label}: {RUN_FILE} component {name!r} is malformed; expected a file name and sha256")


def _warn_changed_parents(parents: Mapping[str, Mapping[str, str]], label: str) -> None:
    """A parent that still exists but has changed since: the child is self-contained, but say so."""
    for role, parent in parents.items():
        path = Path(parent.get("path", "")) / RUN_FILE
        if path.is_file() and sha256_file(path) != parent.get("sha256"):
            logger.warning("%s: its parent %s (%s) has changed since this run was built on it", label, role,
                           path.parent)
