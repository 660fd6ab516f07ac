"""Atomic writes: complete files or nothing, no temporary files left behind."""

from __future__ import annotations

import os
import stat

import nibabel as nib
import numpy as np
import pytest

from demist.atomic import atomic_path, atomic_write


def test_atomic_write_creates_folders_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "summary.json"
    assert atomic_write(target, "first ✓") == target
    assert target.read_text(encoding="utf-8") == "first ✓"
    atomic_write(target, b"\x00second")
    assert target.read_bytes() == b"\x00second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_an_interrupt_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "psr.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt  # Ctrl-C: the commonest interruption, not an Exception
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["psr.nii.gz"]


def test_temporary_keeps_the_extension_for_format_sniffing_writers(tmp_path):
    target = tmp_path / "psr.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz") and tmp != target
        nib.Nifti1Image(np.ones((2, 2, 2), np.float32), np.eye(4)).to_filename(tmp)
    assert np.asarray(nib.load(target).dataobj).sum() == 8
    assert [p.name for p in tmp_path.iterdir()] == ["psr.nii.gz"]


def test_new_files_get_the_usual_permissions_and_replaced_files_keep_theirs(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    fresh = atomic_write(tmp_path / "new.txt", "x")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    kept = tmp_path / "kept.txt"
    kept.write_text("x")
    kept.chmod(0o640)
    atomic_write(kept, "y")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640
