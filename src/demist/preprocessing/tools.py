"""The optional preprocessing libraries, imported on first use with a one-line error naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from demist.errors import DemistError

EXTRA = "preprocess"
_MODULES = {"ants": "antspyx", "deepbet": "deepbet"}


def require(module: str) -> ModuleType:
    """Import `module` ("ants" or "deepbet"), or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DemistError(f"{module} ({_MODULES[module]}) is not installed; demist preprocess needs the extra: "
                          f"pip install 'demist[{EXTRA}]'") from exc


def require_all() -> None:
    """Check every preprocessing library at once, before a command writes anything."""
    for module in _MODULES:
        require(module)
