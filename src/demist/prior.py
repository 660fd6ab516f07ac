"""Pretrained priors: a PSR autoencoder, a condition autoencoder and the unconditional backbone in the PSR latent.

The paper freezes a backbone pretrained on a large corpus (the MONAI brain-MRI LDM bundle), so a cohort only trains
what is specific to it. A prior plays that part here: with one, Stage 1 is the alignment of E_cond on the cohort (the
autoencoders and the latent scale come from the prior) and the prior's backbone is frozen in Stage 2.

A prior is a directory holding three run directories, `psr_ae/`, `cond_ae/` and `backbone/`. demist ships one for the
`tiny` preset (`demist/priors/tiny`), pretrained on a synthetic cohort generated with a seed of its own, so it shares
no subject with a cohort generated with another seed; `scripts/train_prior.sh` reproduces it (`docs/prior.md`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from demist.config import INPUT_SCALING_KEYS, Config
from demist.errors import DemistError
from demist.runs import METRICS_FILE, RUN_FILE, RunInfo, read_run, state_digest
from demist.models.from_runs import BACKBONE_STAGE, PSR_DIGEST

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"  # the prior shipped for the config's preset
NO_PRIOR = "none"  # train the autoencoders and the backbone on the cohort
DESCRIPTION = "prior.json"  # how the prior was made: its synthetic cohort and the command
#: The run directories of a prior, and the stage each must be.
PRIOR_RUNS = {"psr_ae": "autoencoder-psr", "cond_ae": "autoencoder-cond", "backbone": BACKBONE_STAGE}
#: Config sections a cohort's config must share with the prior (the patch size of [data] may differ).
SHARED_SECTIONS = ("autoencoder", "data", "unet", "diffusion")
#: The shipped tiny prior's synthetic cohort (seed and size), apart from the default seed 0 of every command.
PRIOR_SEED = 1000
PRIOR_SUBJECTS = 40
_EXPORTED = (RUN_FILE, METRICS_FILE)  # besides the weights, what a prior keeps of each run


@dataclass(frozen=True)
class Prior:
    """A verified prior: its run directories and the latent scale its backbone was trained with."""

    path: Path
    scale_factor: float
    cohort_seed: int | None = None  # seed of the synthetic cohort it was pretrained on (from prior.json), if known

    @property
    def psr_ae(self) -> Path:
        return self.path / "psr_ae"

    @property
    def cond_ae(self) -> Path:
        return self.path / "cond_ae"

    @property
    def backbone(self) -> Path:
        return self.path / "backbone"


def embedded_prior_dir(preset: str) -> Path:
    """Where the prior shipped for `preset` lives (it may not exist: only `tiny` has one)."""
    return Path(str(resources.files("demist").joinpath("priors", preset.split("+")[0])))


def resolve_prior(spec: str | Path | None, cfg: Config, what: str = "--prior") -> Prior | None:
    """The prior named by `spec` ("embedded", "none"/None, or a prior directory), checked against `cfg`."""
    if spec is None or str(spec) == NO_PRIOR:
        return None
    if str(spec) == EMBEDDED:
        path = embedded_prior_dir(cfg.preset)
        if not (path / "backbone").is_dir():
            raise DemistError(f"{what} embedded: no prior shipped for the {cfg.preset!r} preset (expected at {path}; "
                              f"demist ships one for tiny, made by scripts/train_prior.sh); expected {what} none "
                              "(train everything on the cohort) or a prior directory")
    else:
        path = Path(spec)
        if not path.is_dir():
            raise DemistError(f"{what} {path}: not a directory; expected {EMBEDDED}, {NO_PRIOR} or a prior directory "
                              f"holding {', '.join(PRIOR_RUNS)}")
        if not (path / "backbone").is_dir() and (path / "prior" / "backbone").is_dir():
            raise DemistError(f"{what} {path}: the folder of `demist train prior --out`; expected the prior inside "
                              f"it, {path / 'prior'}")
    runs = {name: read_run(path / name, stage, what=f"{what} {path}: {name}") for name, stage in PRIOR_RUNS.items()}
    backbone = runs["backbone"]
    psr_digest = state_digest(runs["psr_ae"].weights("autoencoder"))
    if backbone.training.get(PSR_DIGEST) != psr_digest or not backbone.latent_scale_factor:
        raise DemistError(f"{what} {path}: its backbone was not trained in the latent of its psr_ae (the PSR "
                          "autoencoder digest or the latent scale factor does not match); expected a prior written by "
                          "`demist train prior`")
    section = cfg.first_difference(backbone.config, SHARED_SECTIONS, ignore=INPUT_SCALING_KEYS)
    if section is not None:
        raise DemistError(f"{what} {path}: config section [{section}] differs from the prior's "
                          f"({getattr(backbone.config, section)}); expected the same [{section}] as the prior "
                          f"(or {what} none)")
    prior_data = runs["cond_ae"].config.data
    if any(getattr(prior_data, key) != getattr(cfg.data, key) for key in INPUT_SCALING_KEYS["data"]):
        logger.info("prior %s: its condition autoencoder saw T1w/FLAIR scaled by percentiles %g–%g (margin %g mm); "
                    "the alignment retrains E_cond on %g–%g (margin %g mm)", path, prior_data.percentile_low,
                    prior_data.percentile_high, prior_data.percentile_margin_mm, cfg.data.percentile_low,
                    cfg.data.percentile_high, cfg.data.percentile_margin_mm)
    description = _read_description(path, what)
    logger.info("prior %s: PSR and condition autoencoders and backbone, latent scale %.4g", path,
                backbone.latent_scale_factor)
    return Prior(path=path, scale_factor=float(backbone.latent_scale_factor),
                 cohort_seed=description.get("cohort", {}).get("seed"))


def _read_description(path: Path, what: str) -> dict:
    """The prior's `prior.json` (how it was made), or {} for a prior without one."""
    file = path / DESCRIPTION
    if not file.is_file():
        return {}
    try:
        description = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DemistError(f"{what} {path}: {DESCRIPTION} is not readable JSON ({exc}); expected the file written by "
                          "`demist train prior`") from None
    return description if isinstance(description, dict) else {}


def check_cohort_apart(manifest: str | Path, prior: Prior | None) -> None:
    """Refuse a synthetic cohort generated with the seed of the prior's own cohort: the prior has seen its subjects.

    Only cohorts written by `demist phantom` record their seed, and only priors written by `demist train prior`
    record theirs; anything else passes."""
    from demist.data.phantom.cohort import COHORT_MARKER

    marker = Path(manifest).parent / COHORT_MARKER
    if prior is None or prior.cohort_seed is None or not marker.is_file():
        return
    try:
        seed = json.loads(marker.read_text()).get("seed")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # not a cohort description demist can read: nothing to compare
    if seed == prior.cohort_seed:
        raise DemistError(f"--manifest {manifest}: a synthetic cohort of seed {seed}, the seed of the cohort the prior "
                          f"{prior.path} was pretrained on; expected a cohort of another seed (or --prior none)")


def align_to_prior(sessions: Sequence[Any], prior: Prior, cfg: Config, out: str | Path,
                   **training: Any) -> RunInfo | None:
    """Stage 1 on a cohort with a prior: E_cond (from the prior's condition autoencoder) aligned to the prior's PSR
    latent on these sessions, keeping the prior's latent scale so that its backbone applies."""
    from demist.training.stage1 import train_alignment

    return train_alignment(sessions, prior.psr_ae, prior.cond_ae, out, cfg=cfg, scale_factor=prior.scale_factor,
                           **training)



def train_prior(out: str | Path, cfg: Config, *, subjects: int = PRIOR_SUBJECTS, seed: int = PRIOR_SEED,
                max_steps: int | None = None, device: str = "auto") -> Prior:
    """Pretrain a prior into `out`: a synthetic cohort (out/cohort), Stage 1 and the backbone on all of it
    (out/runs), and the prior itself (out/prior: the three runs without their checkpoints). Resumable: finished
    parts are kept when rerun."""
    from demist.data.manifest import MANIFEST_NAME, load_manifest
    from demist.data.phantom import generate_cohort
    from demist.data.phantom.cohort import check_same_cohort
    from demist.training.backbone import train_backbone
    from demist.training.stage1 import train_stage1

    out = Path(out)
    manifest = out / "cohort" / MANIFEST_NAME
    check_same_cohort(out / "cohort", subjects, cfg.data.spacing, seed)  # a rerun continues the same prior
    if not manifest.is_file():
        generate_cohort(out / "cohort", subjects, spacing=cfg.data.spacing, seed=seed)
    runs = out / "runs"
    if not (runs / "stage1" / "stage1" / RUN_FILE).is_file():
        train_stage1(load_manifest(manifest), cfg, runs / "stage1", max_steps=max_steps, device=device, resume=True)
    if not (runs / "backbone" / RUN_FILE).is_file():
        train_backbone(manifest, runs / "stage1" / "stage1", cfg, runs / "backbone", max_steps=max_steps,
                       device=device, resume=(runs / "backbone").exists())
    description = {"cohort": {"generator": "demist.data.phantom", "subjects": subjects, "seed": seed,
                              "spacing": cfg.data.spacing}, "preset": cfg.preset,
                   "command": f"demist train prior --config {cfg.preset} --subjects {subjects} --seed {seed}"
                              + (f" --max-steps {max_steps}" if max_steps else "")}
    return export_prior({"psr_ae": runs / "stage1" / "psr_ae", "cond_ae": runs / "stage1" / "cond_ae",
                         "backbone": runs / "backbone"}, out / "prior", cfg, description)


def export_prior(sources: dict[str, Path], dest: str | Path, cfg: Config, description: dict | None = None) -> Prior:
    """Copy finished runs (their run.json, weights and metrics; not their checkpoints) into a prior directory,
    byte for byte so that every sha256 still holds, with `description` as its prior.json; verify the result."""
    import shutil

    from demist.atomic import atomic_path, atomic_write

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if description is not None:
        atomic_write(dest / DESCRIPTION, json.dumps(description, indent=1) + "\n")
    for name, stage in PRIOR_RUNS.items():
        run = read_run(sources[name], stage, what=f"prior part {name}")
        target = dest / name
        target.mkdir(parents=True, exist_ok=True)
        files = [entry["file"] for entry in run.components.values()] + [f for f in _EXPORTED
                                                                        if (run.path / f).is_file()]
        for file in files:
            with atomic_path(target / file) as tmp:  # an interrupted export leaves no half-copied weights
                shutil.copyfile(run.path / file, tmp)
    return resolve_prior(dest, cfg, what="exported prior")
