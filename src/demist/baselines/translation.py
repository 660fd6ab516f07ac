"""What the deep baselines share: one network that maps [T1w, FLAIR] to PSR / psr_range, trained on patches.

KL-GAN, VQ-VAE and cWDM each subclass `TranslationSynthesizer` (build the network, translate a batch of patches)
and define their training `Stage`; `train_translation` does the rest the same way for all three: sessions and
patches from the manifest, the one training loop (`demist.training.loop.train`, checkpoints and resume included),
a PSNR on fixed training patches, and a run directory (method = the baseline's name, stage "baseline").
Prediction covers the whole prepared volume in overlapping tiles of the training patch size (`inference.tiling`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from demist.baselines import BASELINE_STAGE, training_records
from demist.config import Config
from demist.data.patches import PatchSampler, load_sessions
from demist.data.preprocess import PreparedSession
from demist.errors import DemistError
from demist.devices import bf16_autocast, resolve_device
from demist.inference.tiling import tiled
from demist.models.autoencoder import pad_to_multiple
from demist.runs import RunInfo, read_run, write_run
from demist.training.loop import Stage, seed_everything, train
from demist.training.losses import reconstruction_loss, voxel_weights
from demist.training.run_output import check_out, data_fingerprint, training_record, weights_metadata

logger = logging.getLogger(__name__)


def translation_loss(config: Config, prediction: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[stage1]'s reconstruction term against the PSR target: L1 (+ L2), background voxels down-weighted."""
    s1 = config.stage1
    weights = voxel_weights(batch["brain"], s1.background_weight)
    return reconstruction_loss(prediction, batch["target"], weights, s1.l1_weight, s1.l2_weight)


@dataclass
class TranslationSynthesizer:
    """A trained translation network; subclasses set `method` and implement `build_network`, `divisor`, `translate`."""

    config: Config
    network: nn.Module
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    use_bf16: bool = True  # bf16 autocast at inference where the hardware has it
    method: ClassVar[str] = ""
    prediction_type: ClassVar[str | None] = None  # what a diffusion network predicts (recorded in run.json)
    # -- what each baseline defines ------------------------------------------------------------------------------

    @classmethod
    def build_network(cls, config: Config) -> nn.Module:
        """A randomly initialised network of the configured architecture."""
        raise NotImplementedError

    @classmethod
    def divisor(cls, config: Config) -> int:
        """Input sizes must be multiples of this (the network's total downsampling)."""
        raise NotImplementedError

    def translate(self, condition: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """PSR / psr_range for a batch (B, 2, D, H, W) whose sizes are multiples of `divisor`, as float32."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for the network where the device supports it (and `use_bf16`), else nothing."""
        return bf16_autocast(self.device) if self.use_bf16 else contextlib.nullcontext()

    @property
    def tile(self) -> tuple[int, int, int]:
        """Image voxels per inference tile: the training patch size."""
        return tuple(int(p) for p in self.config.data.patch_size)

    def _condition(self, session: PreparedSession) -> tuple[torch.Tensor, tuple[slice, ...]]:
        """The session's [T1w, FLAIR] as (1, 2, …) on the device, padded to the divisor; and the crop back."""
        condition = torch.from_numpy(session.condition)[None].to(self.device)
        return pad_to_multiple(condition, self.divisor(self.config))

    @torch.no_grad()
    def predict(self, session: PreparedSession, samples: int = 1, seed: int = 0,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """PSR / psr_range on the session's model grid (zero outside the brain); deterministic, so no SD."""
        if samples < 1:
            raise DemistError(f"samples: got {samples}; expected at least 1")
        condition, crop = self._condition(session)
        output = tiled(self.translate, condition, self.tile, self.config.sampling.tile_overlap, progress=progress)
        return (output[crop][0, 0].cpu().numpy() * session.brain).astype(np.float32), None

    @torch.no_grad()
    def patch_psnr(self, batches: Sequence[dict[str, torch.Tensor]], seed: int = 0) -> float:
        """PSNR (data range 1) of the translation inside the brain over patches (one sample for a diffusion model)."""
        errors = []
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for batch in batches:
            prediction = self.translate(batch["cond"].to(self.device), generator).cpu()
            errors.append(((prediction - batch["target"]) ** 2)[batch["brain"] > 0.5])
        return float(-10.0 * torch.log10(torch.cat(errors).mean().clamp_min(1e-12)))

    def save(self, run_dir: str | Path) -> RunInfo:
        """Write `<method>.safetensors` (the network) and run.json."""
        return write_run(run_dir, method=self.method, stage=BASELINE_STAGE, config=self.config,
                         components={self.method: self.network.state_dict()}, training=self.training,
                         prediction_type=self.prediction_type, metrics=self.metrics)

    @classmethod
    def from_run(cls, run: RunInfo, device: str = "auto", **options: Any) -> "TranslationSynthesizer":
        """The network of a verified baseline run, on `device`, in eval mode; `options` go to the constructor."""
        if run.method != cls.method:
            raise DemistError(f"{cls.method} run {run.path}: holds method {run.method!r}; expected {cls.method!r}")
        network = cls.build_network(run.config)
        try:
            network.load_state_dict(run.weights(cls.method), strict=True)
        except RuntimeError as exc:
            raise DemistError(f"{cls.method} run {run.path}: weights do not fit the configured network "
                              f"({str(exc).splitlines()[0]}); expected the run's own weights") from None
        torch_device = resolve_device(device)
        network.to(torch_device).eval().requires_grad_(False)
        return cls(config=run.config, network=network, training=dict(run.training), metrics=dict(run.metrics),
                   device=torch_device, **options)

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto", **options: Any) -> "TranslationSynthesizer":
        """Read a run directory written by `save` (or by the baseline's training function)."""
        run = read_run(run_dir, stages=BASELINE_STAGE, what=f"{cls.method} run")
        return cls.from_run(run, device=device, **options)


StageBuilder = Callable[[Config, nn.Module, PatchSampler], Stage]


def check_patch_size(config: Config, divisor: int, method: str) -> None:
    """Training patches (and so inference tiles) must be multiples of the network's downsampling."""
    patch = tuple(config.data.patch_size)
    if any(p % divisor for p in patch):
        raise DemistError(f"config key data.patch_size: {list(patch)} cannot be used by {method}; expected "
                          f"multiples of {divisor}")


def train_translation(synthesizer_cls: type[TranslationSynthesizer], build_stage: StageBuilder, manifest: str | Path,
                      config: Config, out: str | Path, *, max_steps: int | None = None, device: str = "auto",
                      resume: bool = False, subjects: Sequence[str] | None = None, tensorboard: bool = False
                      ) -> TranslationSynthesizer:
    """Train one deep baseline on the manifest's sessions (or `subjects`') into the run directory `out`.

    `max_steps` overrides [baselines] steps (and is recorded in the run's config). Returns the trained synthesizer
    (every process of a multi-process launch returns it; the main process writes the run).
    """
    method, out = synthesizer_cls.method, Path(out)
    check_out(out, resume)
    if max_steps is not None:
        config = config.replace(baselines=dataclasses.replace(config.baselines, steps=max_steps))
    check_patch_size(config, synthesizer_cls.divisor(config), method)
    records = training_records(manifest, subjects)
    sessions = load_sessions(records, config.data, need_target=True)
    sampler = PatchSampler(sessions, config.data.patch_size, config.baselines.batch_size, config.train.seed)
    seed_everything(config.train.seed)
    network = synthesizer_cls.build_network(config)
    stage = build_stage(config, network, sampler)
    result = train(stage, out, config.train, device=device, resume=resume, tensorboard=tensorboard,
                   weights_metadata=weights_metadata(config, stage.name, data_fingerprint(sessions)))
    training = training_record(result, sessions, manifest, subjects)
    model = synthesizer_cls(config=config, network=network.eval(), training=training,
                            device=next(network.parameters()).device)
    if result.is_main_process:
        model.metrics["train_patch_psnr"] = model.patch_psnr(sampler.evaluation_batches(), seed=config.train.seed)
        logger.info("%s: PSNR %.2f dB inside the brain on evaluation patches of the training sessions", method,
                    model.metrics["train_patch_psnr"])
        model.save(out)
    from accelerate import PartialState

    PartialState().wait_for_everyone()  # the other processes return once the run is written
    return model
