"""Configuration: frozen dataclasses loaded from TOML presets.

`load_config("tiny")` or `load_config("paper")` reads a preset shipped with the package. `load_config("my.toml")`
reads a user file that names its base preset (`base = "tiny"`) and overrides any keys of it. Unknown keys and
values of the wrong type are errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from demist.errors import DemistError

PRESETS = ("tiny", "paper")

logger = logging.getLogger(__name__)
PRECISIONS = ("auto", "no", "bf16", "fp16")
GATE_INITS = ("zero", "default")  # demist.controlnet_gate_init
CONTROLNET_HINTS = ("latent", "latent+image")  # demist.controlnet_hint
AUTOENCODER_NORMS = ("group", "channel")  # autoencoder.norm
#: DEMIST's three streams, each by its [demist] switch (also its `demist train demist --no-<switch>` flag and the
#: "demist-no-<switch>" ablation's name).
STREAM_SWITCHES = {"semantic": "crossattn", "spatial": "controlnet", "adaptive": "lora"}


def check_precision(key: str, value: str) -> None:
    """A mixed-precision setting is one accelerate knows, or "auto" (bf16 where the hardware has it)."""
    if value not in PRECISIONS:
        raise DemistError(f"config key {key}: got {value!r}; expected one of {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing shared by training and inference."""

    spacing: float  # mm, isotropic model grid
    psr_range: float  # PSR is divided by this for training and every metric, and multiplied back on output
    percentile_low: float  # T1w/FLAIR scaling to [0, 1] within the brain
    percentile_high: float
    # the percentiles are taken this far inside the brain mask's edge (paper: 0, the whole mask), so that where a
    # skull-stripping tool puts the edge does not move every voxel's scaled intensity
    percentile_margin_mm: float
    patch_size: tuple[int, int, int]  # training patches, voxels of the model grid
    divisor: int  # model input sizes are padded to a multiple of this

    def __post_init__(self) -> None:
        if not 0 <= self.percentile_low < self.percentile_high <= 100:
            raise DemistError(f"config keys data.percentile_low / percentile_high: got {self.percentile_low} / "
                              f"{self.percentile_high}; expected 0 <= low < high <= 100")
        if not self.percentile_margin_mm >= 0:
            raise DemistError(f"config key data.percentile_margin_mm: got {self.percentile_margin_mm}; expected a "
                              "distance >= 0 in mm (0: the whole brain mask, as the paper)")


@dataclass(frozen=True)
class AutoencoderConfig:
    """MONAI AutoencoderKL architecture (the same for the PSR and the condition autoencoder)."""

    channels: tuple[int, ...]
    latent_channels: int
    num_res_blocks: int
    norm_num_groups: int
    norm_eps: float  # GroupNorm epsilon: 1e-6 in the bundle; ~1 keeps most of a quantitative map's intensity scale
    patch_size: tuple[int, int, int]  # training patches, and the window in which whole volumes are encoded/decoded
    # "group": MONAI's GroupNorm, statistics over the field of view (the bundle, the paper); "channel": each voxel
    # normalised over its channels, so an output does not depend on the window it was computed in
    norm: str

    def __post_init__(self) -> None:
        if self.norm not in AUTOENCODER_NORMS:
            raise DemistError(f"config key autoencoder.norm: got {self.norm!r}; "
                              f"expected one of {', '.join(AUTOENCODER_NORMS)}")


@dataclass(frozen=True)
class TrainConfig:
    """What every training stage shares: seeding, precision, checkpoints."""

    seed: int
    mixed_precision: str  # "auto" (bf16 where supported), "no", "bf16" or "fp16" (CUDA only)
    gradient_accumulation: int
    checkpoint_every: int
    log_every: int

    def __post_init__(self) -> None:
        check_precision("train.mixed_precision", self.mixed_precision)


@dataclass(frozen=True)
class Stage1Config:
    """Autoencoder training: L1 (+ L2) + KL + Sobel-edge + patch-adversarial loss."""

    steps: int  # the PSR autoencoder's
    cond_steps: int  # the condition autoencoder's (the alignment fine-tunes it further)
    batch_size: int
    learning_rate: float
    l1_weight: float
    l2_weight: float
    kl_weight: float
    edge_weight: float
    adv_weight: float
    # step at which the discriminator and the adversarial term switch on (the condition AE: same fraction)
    adv_start: int
    background_weight: float  # weight of voxels outside the brain mask in the reconstruction loss
    disc_channels: int
    disc_layers: int
    # Precision of the autoencoder stages (this one and [align]), which are convolution-only and train about 2× faster
    # in bf16 on a CPU with AVX-512 bf16; values as train.mixed_precision, which the diffusion stages use.
    mixed_precision: str

    def __post_init__(self) -> None:
        check_precision("stage1.mixed_precision", self.mixed_precision)


@dataclass(frozen=True)
class AlignConfig:
    """Fine-tuning E_cond so that z_c matches z_y, with E_PSR frozen."""

    steps: int
    batch_size: int
    learning_rate: float
    recon_weight: float  # keeps the condition autoencoder's reconstruction while it aligns
    # L1 of D_PSR(μ_c) against the true PSR in the brain, through the frozen PSR decoder: the latent distance weighs
    # every latent channel alike, the decoded PSR weighs them as the output does (paper: 0, latent distance only)
    image_weight: float
    # T1w and FLAIR patches times a random smooth field (coefficients of its log-polynomial in ±bias_field), so that
    # z_c ignores what a bias correction leaves of a scanner's receive field (paper: 0, no augmentation)
    bias_field: float

    def __post_init__(self) -> None:
        if not self.bias_field >= 0:
            raise DemistError(f"config key align.bias_field: got {self.bias_field}; expected ≥ 0 (0: no augmentation)")


@dataclass(frozen=True)
class UNetConfig:
    """MONAI DiffusionModelUNet architecture of the frozen backbone."""

    channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    num_head_channels: tuple[int, ...]
    num_res_blocks: int
    norm_num_groups: int


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule and prediction target (the bundle: scaled-linear 0.0015–0.0195, 1000 steps, epsilon)."""

    num_train_timesteps: int
    beta_schedule: str
    beta_start: float
    beta_end: float
    prediction_type: str  # "epsilon", "v_prediction" or "sample"


@dataclass(frozen=True)
class BackboneConfig:
    """Pretraining the unconditional latent backbone when no bundle checkpoint is available."""

    steps: int
    batch_size: int
    learning_rate: float


@dataclass(frozen=True)
class DemistConfig:
    """Stage 2: the three conditioning streams around the frozen backbone, and their loss."""

    crossattn: bool
    controlnet: bool
    lora: bool
    token_grid: tuple[int, int, int]  # semantic tokens: z_c is pooled to this grid
    token_dim: int
    lora_rank: int
    lora_alpha: float
    steps: int
    batch_size: int
    learning_rate: float
    edge_weight: float
    edge_every: int  # the decoded-edge term runs on every n-th step only (it decodes through D_PSR)
    align_weight: float  # acts only when finetune_cond_encoder is true
    finetune_cond_encoder: bool
    # Departures from the paper's recipe, each one setting away from it (the paper's value in brackets):
    # "zero" [paper] or "default": the ControlNet's input gate. Zero at both ends of the ControlNet means no gradient
    # reaches its body at step 1; a default-initialised input gate keeps the network equal to the backbone at init
    # (the output gates are still zero) and lets the copy learn from the first step.
    controlnet_gate_init: str
    # Learning-rate multiplier of the zero-initialised tensors (ControlNet output gates, a zero input gate,
    # cross-attention output projections, LoRA-B) [paper: 1.0].
    zero_init_lr_scale: float
    # "latent" [paper]: the ControlNet sees z_c only. "latent+image": it also sees T1w + FLAIR at image resolution
    # through MONAI's ControlNet conditioning embedding, i.e. what E_cond compresses away.
    controlnet_hint: str
    hint_channels: tuple[int, ...]  # the image hint's embedding channels: one 2× downsampling per entry after the first
    # The image hint's embedding (full-resolution convolutions, ~70 % of an fp32 Stage-2 step) runs under bf16
    # autocast where the hardware has bf16, even when the rest trains in fp32 [paper: no image hint; false].
    hint_bf16: bool
    lora_output_projection: bool  # LoRA on W_O as well as W_Q, W_K, W_V [paper: true]
    # Training timesteps t = ⌊T·u^p⌋, u ~ U(0, 1) [paper: 1, uniform]. p < 1 draws the noisy timesteps, where only
    # the condition can decide the sample, more often (p = 0.5: density rising linearly in t).
    timestep_power: float
    # Input perturbation γ against exposure bias [paper: 0]: the network sees x_t noised with ε + γ·ξ (ξ ~ N(0, I)) and
    # is trained on the target of ε alone, so it learns to undo the small errors of its own earlier sampling steps.
    input_perturbation: float
    # Decay of an exponential moving average of the trained weights, which the run keeps [paper: 0, none].
    ema_decay: float
    # A 1×1×1 conv from the ControlNet's last full-resolution output to the network's output [paper: false], so that
    # the spatial stream can reach the prediction without passing through the frozen decoder.
    controlnet_output_head: bool

    @property
    def uses_image_hint(self) -> bool:
        """Whether the ControlNet's hint includes T1w + FLAIR at image resolution."""
        return self.controlnet and self.controlnet_hint == "latent+image"

    @property
    def uses_output_head(self) -> bool:
        """Whether the ControlNet also reaches the output directly (`controlnet_output_head`; needs the ControlNet)."""
        return self.controlnet and self.controlnet_output_head

    def __post_init__(self) -> None:
        if self.controlnet_gate_init not in GATE_INITS:
            raise DemistError(f"config key demist.controlnet_gate_init: got {self.controlnet_gate_init!r}; "
                              f"expected one of {', '.join(GATE_INITS)}")
        if self.controlnet_hint not in CONTROLNET_HINTS:
            raise DemistError(f"config key demist.controlnet_hint: got {self.controlnet_hint!r}; "
                              f"expected one of {', '.join(CONTROLNET_HINTS)}")
        if not self.zero_init_lr_scale > 0:
            raise DemistError(f"config key demist.zero_init_lr_scale: got {self.zero_init_lr_scale}; "
                              "expected a positive number")
        if not self.timestep_power > 0:
            raise DemistError(f"config key demist.timestep_power: got {self.timestep_power}; "
                              "expected a positive number (1: uniform timesteps)")
        if not 0.0 <= self.input_perturbation < 1.0:
            raise DemistError(f"config key demist.input_perturbation: got {self.input_perturbation}; expected a number "
                              "in [0, 1) (0: none)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise DemistError(f"config key demist.ema_decay: got {self.ema_decay}; expected a number in [0, 1) "
                              "(0: no moving average)")
        if not self.hint_channels or min(self.hint_channels) < 1:
            raise DemistError(f"config key demist.hint_channels: got {list(self.hint_channels)}; "
                              "expected a non-empty list of positive channel counts")


@dataclass(frozen=True)
class SamplingConfig:
    """Inference defaults."""

    sampler: str  # "ddim", "dpm++" or "ddpm"
    steps: int
    samples: int
    tile_size: tuple[int, int, int]  # latent voxels per UNet tile
    tile_overlap: float  # fraction of a tile shared with its neighbour
    # 1.0: sampling starts from pure noise at T (the paper). s < 1: from z_c noised to timestep round(s·(T−1)), so the
    # diffusion refines the aligned condition instead of re-sampling around it (SDEdit).
    start_strength: float
    # 0 (the paper): the sampler as it is. σ > 0: every x̂0 takes its Gaussian low-pass (σ latent voxels) from the
    # trajectory's first x̂0, the network's estimate of the conditional mean (`diffusion.anchoring`).
    anchor_sigma: float

    def __post_init__(self) -> None:
        check_start_strength(self.start_strength, "config key sampling.start_strength")
        check_anchor_sigma(self.anchor_sigma, "config key sampling.anchor_sigma")


def check_anchor_sigma(value: float, name: str) -> None:
    """An anchor width is a number of latent voxels >= 0; `name` says where it came from."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1e3:
        raise DemistError(f"{name}: got {value!r}; expected a width in latent voxels, >= 0 (0: the paper's sampler)")


def check_start_strength(value: float, name: str) -> None:
    """A start strength is in (0, 1]; `name` says where it came from (a config key or --start-strength)."""
    if not 0.0 < value <= 1.0:
        raise DemistError(f"{name}: got {value}; expected a number in (0, 1] (1: start from pure noise, as the paper)")


@dataclass(frozen=True)
class DistillConfig:
    """`demist train distill`: a student that takes `student_steps` DDIM steps where its teacher run takes the
    [sampling] sampler and steps it was trained with."""

    student_steps: int
    steps: int
    batch_size: int
    learning_rate: float

    def __post_init__(self) -> None:
        for key in ("student_steps", "steps", "batch_size"):
            if getattr(self, key) < 1:
                raise DemistError(f"config key distill.{key}: got {getattr(self, key)}; expected an integer >= 1")


@dataclass(frozen=True)
class EvaluationConfig:
    """The lesion-contrast protocol."""

    ring_mm: float  # width of the proximal NAWM ring around each lesion
    bootstrap: int  # resamples for the AUC confidence intervals


@dataclass(frozen=True)
class BaselineConfig:
    """The deep baselines: KL-GAN, VQ-VAE and cWDM, trained on [data] patches to map T1w + FLAIR to PSR directly, and
    FT-LDM, DEMIST's backbone fine-tuned with the condition concatenated.

    They share [stage1]'s reconstruction and adversarial weights and its discriminator; KL-GAN's encoder-decoder
    has the [autoencoder] architecture and cWDM diffuses with the [diffusion] noise schedule (predicting x0).
    """

    steps: int
    batch_size: int
    learning_rate: float
    klgan_adv_start: int  # step at which KL-GAN's discriminator and adversarial term switch on
    vq_channels: tuple[int, ...]  # VQ-VAE channels per level; each level downsamples 2×
    vq_num_embeddings: int  # codebook size
    vq_embedding_dim: int
    cwdm_channels: tuple[int, ...]  # cWDM's DiffusionModelUNet; self-attention at the last level only
    cwdm_num_head_channels: int
    cwdm_num_res_blocks: int
    cwdm_norm_num_groups: int
    # FT-LDM fine-tunes the whole backbone UNet (condition concatenated) for [demist] steps and batch size.
    ftldm_learning_rate: float


@dataclass(frozen=True)
class Config:
    """Everything a run needs; stored whole in every run directory."""

    preset: str
    data: DataConfig
    autoencoder: AutoencoderConfig
    train: TrainConfig
    stage1: Stage1Config
    align: AlignConfig
    unet: UNetConfig
    diffusion: DiffusionConfig
    backbone: BackboneConfig
    demist: DemistConfig
    sampling: SamplingConfig
    distill: DistillConfig
    evaluation: EvaluationConfig
    baselines: BaselineConfig

    def replace(self, **sections: Any) -> "Config":
        """A copy with some sections replaced: `cfg.replace(demist=dataclasses.replace(cfg.demist, lora=False))`."""
        return dataclasses.replace(self, **sections)

    def first_difference(self, other: "Config", sections: Sequence[str],
                         ignore: Mapping[str, Sequence[str]] | None = None) -> str | None:
        """The first of `sections` in which two runs' configs disagree (None: they agree), ignoring the keys that each
        training stage chooses for itself (`STAGE_OWN_KEYS`) and those named in `ignore` ({section: keys})."""
        for section in sections:
            skip = {*STAGE_OWN_KEYS.get(section, ()), *(ignore or {}).get(section, ())}
            ours, theirs = ({k: v for k, v in dataclasses.asdict(getattr(cfg, section)).items() if k not in skip}
                            for cfg in (self, other))
            if ours != theirs:
                return section
        return None

    def require_same(self, parent: "Config", sections: Sequence[str], source: str) -> None:
        """Refuse a config (--config) whose `sections` differ from those a parent run (`source`) was trained with."""
        section = self.first_difference(parent, sections)
        if section is not None:
            raise DemistError(f"--config: section [{section}] differs from that of {source}; expected the same "
                              f"[{section}] ({getattr(parent, section)})")


#: Keys a stage may set for itself while it builds on runs with other values: the Stage-2 patch size of [data].
STAGE_OWN_KEYS: dict[str, tuple[str, ...]] = {"data": ("patch_size",)}

#: The keys of how T1w and FLAIR are scaled (by section, as `STAGE_OWN_KEYS`): only the condition encoder sees them,
#: and the alignment retrains it on the cohort's scaling, so a prior or condition autoencoder trained with other values
#: is still a starting point.
INPUT_SCALING_KEYS: dict[str, tuple[str, ...]] = {"data": ("percentile_low", "percentile_high", "percentile_margin_mm")}


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation and convert TOML lists to tuples."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise DemistError(f"config key {key}: got {value!r}; expected a table of {annotation.__name__} keys")
        return _build(annotation, value, key)
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise DemistError(f"config key {key}: got {value!r}; expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise DemistError(f"config key {key}: got {len(value)} values; expected {len(args)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DemistError(f"config key {key}: got {value!r}; expected a number")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DemistError(f"config key {key}: got {value!r}; expected an integer")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise DemistError(f"config key {key}: got {value!r}; expected true or false")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise DemistError(f"config key {key}: got {value!r}; expected a string")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")  # a bug in this module


def _build(cls: type, table: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in table:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise DemistError(f"config key {where}: unknown; expected one of {', '.join(names)}")
    values = {}
    for name in names:
        where = f"{prefix}.{name}" if prefix else name
        if name not in table:
            raise DemistError(f"config key {where}: missing")
        values[name] = _convert(table[name], hints[name], where)
    return cls(**values)


def _merge(base: Mapping[str, Any], override: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    merged = dict(base)
    for k, v in override.items():
        where = f"{prefix}.{k}" if prefix else k
        if k not in base:
            raise DemistError(f"config key {where}: unknown; expected one of {', '.join(base)}")
        merged[k] = _merge(base[k], v, where) if isinstance(v, Mapping) and isinstance(base[k], Mapping) else v
    return merged


def _preset_table(name: str) -> dict[str, Any]:
    text = resources.files("demist").joinpath("presets", f"{name}.toml").read_text()
    return tomllib.loads(text)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise DemistError(f"config {path}: not readable ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise DemistError(f"config {path}: not valid TOML ({exc})") from None


def load_config(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load a preset by name (`tiny`, `paper`) or a TOML file that sets `base = "<preset>"` and overrides keys."""
    text = str(name_or_path)
    if text in PRESETS:
        table = _preset_table(text)
    else:
        path = Path(text)
        if not path.is_file():
            raise DemistError(f"config {text}: neither a preset ({', '.join(PRESETS)}) nor an existing TOML file")
        user = _read_toml(path)
        base = user.pop("base", None)
        if base not in PRESETS:
            raise DemistError(f"config {path}: key base = {base!r}; expected one of {', '.join(PRESETS)}")
        table = _merge(_preset_table(base), user)
        table["preset"] = f"{base}+{path.name}"
    if overrides:
        table = _merge(table, overrides)
    return _build(Config, table)


def config_to_dict(config: Config) -> dict[str, Any]:
    """A JSON/TOML-friendly dict of the whole config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return {k: ({kk: plain(vv) for kk, vv in v.items()} if isinstance(v, dict) else v)
            for k, v in dataclasses.asdict(config).items()}


def config_from_dict(table: Mapping[str, Any]) -> Config:
    """The inverse of `config_to_dict` (used to read the config stored in a run directory).

    A key missing from a stored config (a run written before the key existed) takes the value in `ADDED_KEYS` (what
    such a run did) or else the value of the run's base preset, and a warning names it; unknown keys stay errors.
    """
    base = str(table.get("preset", "")).split("+")[0]
    if base in PRESETS:
        preset = _preset_table(base)
        # a section no earlier run used is filled silently: a run from before it has nothing to reproduce there
        table = {**{k: preset[k] for k in ADDED_SECTIONS if k not in table}, **table}
        filled: list[str] = []
        table = _fill_missing(table, _merge(preset, _nested(ADDED_KEYS)), filled)
        if filled and tuple(filled) not in _WARNED:
            _WARNED.add(tuple(filled))
            # ADDED_KEYS reproduce exactly what such a run did: worth a note, not a warning; a preset value is a guess
            guessed = [key for key in filled if key not in ADDED_KEYS]
            logger.log(logging.WARNING if guessed else logging.INFO,
                       "stored config: %s missing (written by an older demist); what runs did before these keys "
                       "existed (or else the %s preset's values) is used", ", ".join(filled), base)
    return _build(Config, table)


_WARNED: set[tuple[str, ...]] = set()  # each set of missing keys is reported once per process

#: Keys added after runs had been written, with the value that reproduces what a run without the key did (the
#: paper's behaviour), whatever the presets now say: a tiny DEMIST run from before the output head has none.
ADDED_KEYS: dict[str, Any] = {
    "data.percentile_margin_mm": 0.0,
    "autoencoder.norm": "group",
    "sampling.start_strength": 1.0,
    "sampling.anchor_sigma": 0.0,
    "align.image_weight": 0.0,
    "align.bias_field": 0.0,
    "demist.timestep_power": 1.0,
    "demist.input_perturbation": 0.0,
    "demist.ema_decay": 0.0,
    "demist.controlnet_output_head": False,
    "demist.hint_bf16": False,
}


#: Sections added after runs had been written, that configure only commands those runs never ran.
ADDED_SECTIONS: tuple[str, ...] = ("distill",)


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        section, key = dotted.split(".")
        out.setdefault(section, {})[key] = value
    return out


def _fill_missing(table: Mapping[str, Any], defaults: Mapping[str, Any], filled: list[str],
                  prefix: str = "") -> dict[str, Any]:
    out = dict(table)
    for k, v in defaults.items():
        where = f"{prefix}.{k}" if prefix else k
        if k not in out:
            out[k] = v
            filled.append(where)
        elif isinstance(v, Mapping) and isinstance(out[k], Mapping):
            out[k] = _fill_missing(out[k], v, filled, where)
    return out

