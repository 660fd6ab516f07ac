"""Shared fixtures: a small manifest on disk, and the latent-diffusion cohort (a random Stage 1 and a 2-step
backbone). The builders they use are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from demist.data.manifest import write_manifest
from helpers import LATENT_CFG, ellipsoid_session, random_stage1_run, two_subject_manifest, write_session


@pytest.fixture
def small_manifest(tmp_path: Path) -> Path:
    """A manifest of two subjects, three sessions, written as real NIfTI files."""
    rows = []
    for i, (subject, session) in enumerate([("s1", "a"), ("s1", "b"), ("s2", "a")]):
        row = write_session(tmp_path / subject / session, ellipsoid_session(seed=i))
        rows.append({"subject": subject, "session": session, "group": "MS",
                     **{k: str(Path(v).relative_to(tmp_path)) for k, v in row.items()}})
    return write_manifest(tmp_path / "manifest.csv", rows)


@pytest.fixture(scope="module")
def latent_cohort(tmp_path_factory):
    """Two hand-made sessions, a random Stage-1 run and a 2-step backbone: what the latent-diffusion tests train on
    (one per test module)."""
    from demist.training.backbone import train_backbone

    root = tmp_path_factory.mktemp("stage2")
    manifest = two_subject_manifest(root)
    stage1 = random_stage1_run(root / "s1run")
    backbone = train_backbone(manifest, stage1.path, LATENT_CFG, root / "backbone", device="cpu")
    return {"root": root, "manifest": manifest, "stage1": stage1, "backbone": backbone}
