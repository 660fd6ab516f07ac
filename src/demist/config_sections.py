"""The sections of a demist configuration: one frozen dataclass per TOML table, each checking its own values, and the
names of the choices they accept. `demist.config` assembles them into a `Config` and reads and writes TOML."""

from __future__ import annotations

from dataclasses import dataclass

from demist.errors import DemistError

PRECISIONS = ("auto", "no", "bf16", "fp16")
GATE_INITS = ("zero", "default")  # demist.controlnet_gate_init
CONTROLNET_HINTS = ("latent", "latent+image", "latent+subpixel")  # demist.controlnet_hint
AUTOENCODER_NORMS = ("group", "channel")  # autoencoder.norm
#: DEMIST's three streams, each by its [demist] switch (also its `demist train demist --no-<switch>` flag and the
#: "demist-no-<switch>" ablation's name).
STREAM_SWITCHES = {"semantic": "crossattn", "spatial": "controlnet", "adaptive": "lora"}


def check_precision(key: str, value: str) -> None:
    """A mixed-precision setting is one accelerate knows, or "auto" (bf16 where the hardware has it)."""
    if value not in PRECISIONS:
        raise DemistError(f"config key {key}: got {value!r}; expected one of {', '.join(PRECISIONS)}")


def check_positive(section: str, values: object, integers: tuple[str, ...] = (),
                   numbers: tuple[str, ...] = ()) -> None:
    """Counts are integers >= 1 and sizes or rates numbers > 0: a 0 would divide by zero or train on inf."""
    for key in integers:
        value = getattr(values, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DemistError(f"config key {section}.{key}: got {value!r}; expected an integer >= 1")
    for key in numbers:
        value = getattr(values, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise DemistError(f"config key {section}.{key}: got {value!r}; expected a number > 0")


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
        check_positive("data", self, integers=("divisor",), numbers=("spacing", "psr_range"))
        if len(self.patch_size) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                            for v in self.patch_size):
            raise DemistError(f"config key data.patch_size: got {list(self.patch_size)}; expected 3 integers >= 1")
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
        check_positive("train", self, integers=("gradient_accumulation", "checkpoint_every", "log_every"))
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
        check_positive("stage1", self, integers=("batch_size",), numbers=("learning_rate",))
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
        check_positive("align", self, integers=("batch_size",), numbers=("learning_rate",))
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

    def __post_init__(self) -> None:
        check_positive("backbone", self, integers=("batch_size",), numbers=("learning_rate",))


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
    # through MONAI's ControlNet conditioning embedding (strided convolutions at image resolution), i.e. what E_cond
    # compresses away. "latent+subpixel": the same images, each f³ block of voxels moved into channels at latent
    # resolution (MONAI's pixel unshuffle, lossless) and embedded there, at a fraction of the strided cost.
    controlnet_hint: str
    # The image hint's embedding channels: one 2× downsampling per entry after the first, so 2^(len − 1) must be the
    # autoencoder's factor f; with "latent+subpixel" the last entry is the width of its latent-resolution embedding.
    hint_channels: tuple[int, ...]
    # The image hint's embedding runs under bf16 autocast where the hardware has bf16, even when the rest trains in
    # fp32 (for "latent+image" it is full-resolution convolutions, ~70 % of an fp32 Stage-2 step) [paper: no image
    # hint; false].
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
        """Whether the ControlNet's hint includes T1w + FLAIR (strided or rearranged into channels)."""
        return self.controlnet and self.controlnet_hint != "latent"

    @property
    def uses_output_head(self) -> bool:
        """Whether the ControlNet also reaches the output directly (`controlnet_output_head`; needs the ControlNet)."""
        return self.controlnet and self.controlnet_output_head

    def __post_init__(self) -> None:
        check_positive("demist", self, integers=("batch_size",), numbers=("learning_rate",))
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
        check_positive("distill", self, integers=("student_steps", "steps", "batch_size"))


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

    def __post_init__(self) -> None:
        check_positive("baselines", self, integers=("batch_size",), numbers=("learning_rate", "ftldm_learning_rate"))

