"""Atomic file writes: a file either appears complete under its final name or not at all.

Data go to a temporary file in the destination folder (same file system), which is flushed to disk and then
renamed over the target with `os.replace`; on any error the temporary file is removed and an existing target is
left untouched. The temporary name keeps the target's extension (`.psr.k3j9.tmp.nii.gz`), so writers that infer
the format from the name (nibabel, matplotlib) work on it.
"""

from __future__ import annotations

import functools
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from demist.errors import DemistError

__all__ = ["atomic_path", "atomic_write", "check_output_folder"]


@functools.cache
def _new_file_mode() -> int:
    """Permissions a new file would get from `open()` (0o666 minus the umask); mkstemp alone gives 0o600."""
    umask = os.umask(0o022)  # reading the umask means setting it; done once and restored at once
    os.umask(umask)
    return 0o666 & ~umask


def _temporary_name_parts(name: str) -> tuple[str, str]:
    """(prefix, suffix) for a temporary file next to `name` that keeps its (up to two-part) extension."""
    extension = "".join(Path(name).suffixes[-2:])
    if len(extension) >= len(name):  # a dotfile such as ".env": nothing before the extension
        extension = ""
    stem = name[: len(name) - len(extension)]
    return f".{stem}.", f".tmp{extension}"


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on an exception it is deleted.

    The temporary file already exists (empty, so no other process can take its name): write to it by name, e.g.
    `with atomic_path(out) as tmp: img.to_filename(tmp)`. Parent folders are created. The final file gets the
    permissions a newly created file would (or keeps those of the file it replaces).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temporary_name_parts(path.name)
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        mode = path.stat().st_mode & 0o7777 if path.exists() else _new_file_mode()
        os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (str is encoded as UTF-8) to `path` atomically and return `path`."""
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def check_output_folder(path: str | Path, what: str, expected: str = "a folder") -> Path:
    """The folder outputs will go to must not be an existing file: refused before any work, naming `what` (the
    option, e.g. "--out") and what it should be."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DemistError(f"{what} {path}: is a file; expected {expected}")
    return path
