"""The settings a workflow's runs were trained with, recorded in its folder and checked when it is rerun.

`demist demo` and `demist cv` skip every step whose run has finished, so a rerun into the same folder with other
options would otherwise mix runs trained one way with a report that says another.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from demist.atomic import atomic_write
from demist.errors import DemistError


def record_settings(file: Path, settings: dict[str, Any]) -> None:
    """Write `settings` to `file` on the first run; on a rerun, refuse settings that differ, naming each difference
    (for a "config" entry: its sections)."""
    if not file.is_file():
        atomic_write(file, json.dumps(settings, indent=1, sort_keys=True) + "\n")
        return
    try:
        recorded = json.loads(file.read_text())
    except ValueError as exc:
        raise DemistError(f"{file}: not valid JSON ({exc}); expected the settings a previous run recorded") from None
    differ = [f"{key} {recorded.get(key)!r} → {value!r}" for key, value in settings.items()
              if key != "config" and recorded.get(key) != value]
    config, asked = recorded.get("config") or {}, settings.get("config") or {}
    differ += [f"config [{section}]" for section in sorted(set(config) | set(asked))
               if config.get(section) != asked.get(section)]
    if differ:
        raise DemistError(f"--out {file.parent}: its runs were trained with other settings ({'; '.join(differ)}); "
                          "expected the same options as before, or a new --out")
