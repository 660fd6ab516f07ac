"""The setup and the finish that the latent-diffusion stages share (backbone pretraining, DEMIST's Stage 2, FT-LDM).

Setup (`prepare_latent_stage`): refuse to overwrite a finished run, read and check the Stage-1 run (and the frozen
backbone, for the stages that condition one), encode each training session once into whole latents, and build the
seeded patch sampler and the noise schedule. Finish (`write_latent_run`): the run directory with its parents, latent
scale factor and prediction type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from demist.config import Config
from demist.data.manifest import training_records
from demist.data.patches import load_sessions
from demist.diffusion.schedule import NoiseSchedule
from demist.models.autoencoder import downsampling_factor
from demist.models.from_runs import FrozenBackbone, Stage1Parts, load_frozen_backbone, load_stage1
from demist.runs import RunInfo, write_run
from demist.training.latent_diffusion import check_against_stage1, check_sampling_tile
from demist.training.latent_patches import LatentPatchSampler, encode_sessions, encoding_device
from demist.training.run_output import check_out


@dataclass
class LatentStageData:
    """What a latent-diffusion stage trains on. `config` is the stage's (with a frozen backbone's prediction type)."""

    config: Config
    stage1: Stage1Parts
    frozen: FrozenBackbone | None
    sessions: list[Any]
    sampler: LatentPatchSampler
    schedule: NoiseSchedule


def prepare_latent_stage(manifest: str | Path, stage1_run: str | Path, config: Config, out: Path, resume: bool,
                         subjects: Sequence[str] | None, device: str, *, backbone: str | Path | None,
                         batch_size: int, encode_condition: bool, image_keys: tuple[str, ...] = ()) -> LatentStageData:
    """Everything before the loop (see the module docstring). With `backbone` (a backbone run or a bundle file), the
    frozen backbone is loaded and its prediction type is the schedule's; `encode_condition` also encodes
    z_c = μ(E_cond(x)) once; `image_keys` are the image-resolution patches the batches carry as well."""
    check_out(out, resume)
    stage1 = load_stage1(stage1_run)
    check_against_stage1(config, stage1.run, len(config.unet.channels))
    if backbone is not None:  # a stage around a frozen backbone (DEMIST, FT-LDM, a student) is sampled in tiles
        check_sampling_tile(config)
    frozen = load_frozen_backbone(backbone, config, stage1) if backbone is not None else None
    cfg = frozen.config if frozen is not None else config
    sessions = load_sessions(training_records(manifest, subjects), cfg.data, need_target=True)
    encoders = {"z_y": (stage1.psr_autoencoder, "target")}
    if encode_condition:
        encoders["z_c"] = (stage1.cond_autoencoder, "cond")
    factor = downsampling_factor(cfg.autoencoder)
    latents = encode_sessions(sessions, encoders, stage1.scale_factor, cfg.autoencoder.patch_size, factor,
                              cfg.data.patch_size, encoding_device(device), keep=image_keys)
    sampler = LatentPatchSampler(latents, cfg.data.patch_size, factor, batch_size, cfg.train.seed,
                                 image_keys=image_keys)
    schedule = NoiseSchedule.from_config(cfg.diffusion, frozen.prediction_type if frozen is not None else None)
    return LatentStageData(cfg, stage1, frozen, sessions, sampler, schedule)


def write_latent_run(out: Path, data: LatentStageData, *, method: str, stage: str,
                     components: dict[str, dict[str, Any]], training: dict[str, Any],
                     metrics: dict[str, Any], config: Config | None = None,
                     parents: dict[str, RunInfo] | None = None) -> RunInfo:
    """The finished run: its parents are the Stage-1 run, the frozen backbone when it came from a run, and `parents`
    (a distilled student's teacher); its config is `config` when given, else the stage's."""
    frozen_run = data.frozen.run if data.frozen is not None else None
    return write_run(out, method=method, stage=stage, config=config or data.config, components=components,
                     parents={"stage1": data.stage1.run, **({"backbone": frozen_run} if frozen_run else {}),
                              **(parents or {})},
                     latent_scale_factor=data.stage1.scale_factor, prediction_type=data.schedule.prediction_type,
                     training=training, metrics=metrics)

