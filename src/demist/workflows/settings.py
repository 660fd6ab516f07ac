"""The settings a workflow's runs were trained with, recorded in its folder and checked when it is rerun.

`demist demo` and `demist cv` skip every step whose run has finished, so a rerun into the same folder with other
options would otherwise mix runs trained one way with a report that says another.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from demist.atomic import atomic_write
from demist.errors import DemistError

log = logging.getLogger(__name__)

#: Entries of a config that name it rather than set it: `--config tiny` and a TOML file based on tiny are the same.
NAMING_KEYS = ("preset",)


def record_settings(file: Path, settings: dict[str, Any], runs_finished: bool) -> None:
    """Check `settings` against those recorded in `file`, then record them.

    While no run of the folder has finished (`runs_finished` false), the file is simply (re)written. Afterwards, a
    setting recorded before must be the same (for a dict of configs, e.g. "config": each section; a new entry, such
    as a method added to a cross-validation, is added), else a one-line error names every difference. A folder whose
    runs finished before such a file existed cannot be checked: it is left as it is, with a warning.
    """
    recorded = _read(file)
    if recorded is None:
        if runs_finished:
            log.warning("%s: missing, and runs in %s have finished already: their settings cannot be checked",
                        file.name, file.parent)
            return
        recorded = {}
    elif not runs_finished:
        recorded = {}
    differ = [f"{key} {recorded[key]!r} → {value!r}" for key, value in settings.items()
              if key in recorded and not isinstance(value, dict) and recorded[key] != value]
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(recorded.get(key), dict):
            differ += _dict_differences(key, recorded[key], value)
    if differ:
        raise DemistError(f"--out {file.parent}: its runs were trained with other settings ({'; '.join(differ)}); "
                          "expected the same options as before, or a new --out")
    merged = _merged(recorded, settings)
    if merged != recorded:
        atomic_write(file, json.dumps(merged, indent=1, sort_keys=True) + "\n")


def _read(file: Path) -> dict[str, Any] | None:
    if not file.is_file():
        return None
    try:
        recorded = json.loads(file.read_text())
    except ValueError as exc:
        raise DemistError(f"{file}: not valid JSON ({exc}); expected the settings a previous run recorded") from None
    if not isinstance(recorded, dict):
        raise DemistError(f"{file}: holds {type(recorded).__name__}; expected the settings a previous run recorded")
    return recorded


def _dict_differences(key: str, old: dict, new: dict) -> list[str]:
    """The entries of two dicts both hold and that differ (a config: its sections; configs by name: each config)."""
    differ = []
    for name in sorted(set(old) & set(new) - set(NAMING_KEYS)):
        if isinstance(old[name], dict) and isinstance(new[name], dict) and key != "config":
            differ += _dict_differences(f"{key} {name}", old[name], new[name])
        elif old[name] != new[name]:
            differ.append(f"{key} [{name}]")
    return differ


def _merged(old: dict, new: dict) -> dict:
    merged = dict(old)
    for key, value in new.items():
        merged[key] = _merged(old[key], value) if isinstance(value, dict) and isinstance(old.get(key), dict) else value
    return merged
