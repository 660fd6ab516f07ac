"""Builders the tests share: small synthetic NIfTI sessions built in memory, prepared sessions, affines, the tiny
latent-diffusion config and a random Stage-1 run. No network, no downloads. (Fixtures are in conftest.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from demist.config import load_config
from demist.data.manifest import write_manifest
from demist.data.nifti import save_image
from demist.data.preprocess import PreparedSession
from demist.models.autoencoder import build_autoencoder
from demist.runs import write_run


def ellipsoid_session(shape=(40, 44, 36), affine=None, seed: int = 0) -> dict[str, nib.Nifti1Image]:
    """A skull-stripped 'head': an ellipsoid brain with a WM core, one lesion, and PSR that follows tissue."""
    rng = np.random.default_rng(seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(axis=0))
    brain = r < 0.7
    wm = r < 0.45
    lesion = np.sqrt(((grid - np.array([0.2, 0.1, 0.0])[:, None, None, None]) ** 2).sum(axis=0)) < 0.12
    t1w = np.where(wm, 1.0, 0.65) * brain + rng.normal(0, 0.02, shape) * brain
    flair = np.where(wm, 1.0, 1.2) * brain + 0.8 * lesion + rng.normal(0, 0.02, shape) * brain
    psr = (np.where(wm, 0.11, 0.075) - 0.05 * lesion) * brain
    img = lambda a, dt=np.float32: nib.Nifti1Image(a.astype(dt), affine)  # noqa: E731
    return {
        "t1w": img(t1w), "flair": img(flair), "psr": img(psr),
        "brain_mask": img(brain, np.uint8), "lesion_mask": img(lesion & brain, np.uint8),
        "wm_mask": img(wm, np.uint8),
    }


def write_session(folder: Path, images: dict[str, nib.Nifti1Image]) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    row = {}
    for name, image in images.items():
        save_image(image, folder / f"{name}.nii.gz")
        row[name] = str((folder / f"{name}.nii.gz"))
    return row


def two_subject_manifest(root: Path, shape=(28, 30, 26)) -> Path:
    """Two MS subjects with one session each (ellipsoid phantoms of seeds 0 and 1), written under `root`."""
    rows = []
    for i, subject in enumerate(["s1", "s2"]):
        row = write_session(root / subject / "a", ellipsoid_session(shape=shape, seed=i))
        rows.append({"subject": subject, "session": "a", "group": "MS", **row})
    return write_manifest(root / "manifest.csv", rows)


def brain_session(key: str, shape=(20, 18, 16), seed: int = 0) -> PreparedSession:
    rng = np.random.default_rng(seed)
    brain = np.zeros(shape, bool)
    brain[5:15, 4:14, 3:12] = True
    image = lambda: (rng.random(shape) * brain).astype(np.float32)  # noqa: E731
    return PreparedSession(key=key, t1w=image(), flair=image(), brain=brain, grid=None, native_brain=brain, psr=image())


def oblique_affine(spacing=(1.7, 1.7, 2.3)) -> np.ndarray:
    angle = np.deg2rad(17)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = [-30, -40, -35]
    return affine


AFFINES = {
    "RAS": np.diag([2.0, 2.0, 2.0, 1.0]),
    "LAS": np.array([[-2.0, 0, 0, 80], [0, 2.0, 0, -40], [0, 0, 2.0, -30], [0, 0, 0, 1]]),
    "oblique": oblique_affine(),
}


# --- the latent-diffusion stages (backbone, DEMIST, FT-LDM) on two hand-made sessions ----------------------------

LATENT_OVERRIDES = {
    "data": {"patch_size": [16, 16, 16]},
    "autoencoder": {"channels": [8, 16, 16], "norm_num_groups": 8},
    "unet": {"channels": [16, 32, 32], "num_head_channels": [0, 16, 16], "norm_num_groups": 8},
    "train": {"checkpoint_every": 2, "log_every": 1},
    "backbone": {"steps": 2, "batch_size": 1},
    "demist": {"steps": 3, "batch_size": 1, "edge_weight": 0.1, "edge_every": 2, "token_grid": [2, 2, 2],
               "token_dim": 12, "lora_rank": 2, "controlnet_hint": "latent+image", "hint_channels": [4, 8, 8]},
    "sampling": {"tile_size": [4, 4, 4]},  # the Stage-2 latent patch: 16 / 4
}
LATENT_CFG = load_config("tiny", overrides=LATENT_OVERRIDES)


def latent_toml_config(path: Path) -> Path:
    """The same config as a user TOML file (for the command line)."""
    lines = ['base = "tiny"']
    for section, table in LATENT_OVERRIDES.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def random_stage1_run(folder: Path, init_bundle: str | None = None, seed: int = 0):
    """A Stage-1 run with random (untrained) autoencoders; with `init_bundle`, its PSR parent records the bundle."""
    torch.manual_seed(seed)
    psr, cond = build_autoencoder(LATENT_CFG.autoencoder, 1), build_autoencoder(LATENT_CFG.autoencoder, 2)
    psr_run = write_run(folder / "psr_ae", method="demist", stage="autoencoder-psr", config=LATENT_CFG,
                        components={"autoencoder": psr.state_dict()}, training={"init_bundle": init_bundle})
    return write_run(folder / "stage1", method="demist", stage="stage1", config=LATENT_CFG,
                     components={"psr_autoencoder": psr.state_dict(), "cond_autoencoder": cond.state_dict()},
                     parents={"psr_ae": psr_run}, latent_scale_factor=2.0)


class Interrupted(Exception):
    """A training run killed in the middle (raised by `interrupt_latent_batches`)."""


def interrupt_latent_batches(monkeypatch, at_step: int) -> None:
    """Make every latent-diffusion stage fail when it asks for the batch of `at_step` (after the checkpoints before
    it); `monkeypatch.undo()` lets the resumed run go on."""
    from demist.training.latent_patches import LatentPatchSampler

    original = LatentPatchSampler.batch

    def failing(self, step, shard=0):
        if step == at_step:
            raise Interrupted
        return original(self, step, shard)

    monkeypatch.setattr(LatentPatchSampler, "batch", failing)
