"""Every method demist trains and synthesizes with, named once: DEMIST and its single-stream ablations, FT-LDM and the
baselines. The `demist train` commands (`cli/methods.py`), `demist cv --methods`, `load_synthesizer` and the methods
table of the README all derive from `METHODS`.

A method is a name, the shared runs it builds on (`needs`: a Stage-1 run, a backbone), one training function taking a
`TrainJob`, and how a finished run of it is loaded for synthesis. Adding a baseline is its module plus one entry here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Sequence

from demist.config import Config
from demist.config_sections import STREAM_SWITCHES
from demist.errors import DemistError

if TYPE_CHECKING:  # imported lazily at run time: the CLI's --help stays fast
    from demist.inference.base import Synthesizer

log = logging.getLogger(__name__)

#: The shared per-cohort runs a method can build on.
SHARED_RUNS = ("stage1", "backbone")


@dataclass(frozen=True)
class TrainJob:
    """Everything a method's training function gets. `stage1` and `backbone` are set for the methods that need them;
    `subjects` restricts training to those subjects of the manifest (None: all)."""

    manifest: Path
    config: Config
    out: Path
    stage1: Path | None = None
    backbone: Path | None = None
    subjects: Sequence[str] | None = None
    max_steps: int | None = None
    device: str = "auto"
    resume: bool = False
    tensorboard: bool = False
    streams_off: tuple[str, ...] = ()  # DEMIST's stream switches turned off (`--no-<switch>`)


@dataclass(frozen=True)
class Method:
    """One method: see the module docstring. `iterative` methods train in steps (so they take --max-steps, --device
    and --resume); the others are fitted in closed form. `load_options` are the synthesis options it understands.
    `stream_flags`: its command takes one --no-<switch> flag per stream; `ablation_of`: the method whose command
    trains it (with that flag), so it has no command of its own. `report`: the line its command prints about what
    training returned (default: the run directory)."""

    name: str
    summary: str
    needs: tuple[str, ...]
    train: Callable[[TrainJob], object]
    load: Callable[..., Any]  # (run: RunInfo, **options) -> Synthesizer
    stage: str  # the `stage` of the run directories it writes
    iterative: bool = True
    load_options: tuple[str, ...] = ("device",)
    stream_flags: bool = False
    ablation_of: str | None = None
    report: Callable[[Any], str] | None = None


def _demist_trainer(off: str | None) -> Callable[[TrainJob], object]:
    def train(job: TrainJob) -> object:
        from demist.training.stage2 import train_demist

        return train_demist(job.manifest, job.stage1, job.backbone, job.config, job.out, max_steps=job.max_steps,
                            device=job.device, resume=job.resume, subjects=job.subjects, tensorboard=job.tensorboard,
                            streams_off=tuple(dict.fromkeys((*job.streams_off, *([off] if off else [])))))

    return train


def _report_demist(run) -> str:
    m, trainable = run.metrics, run.training["parameters"]["total"]["trainable"]
    return (f"{run.method}: {run.path} ({trainable:,} trained parameters; denoising MSE on evaluation patches "
            f"{m['eval_denoising_mse_backbone']['mean']:.4g} for the backbone alone -> "
            f"{m['eval_denoising_mse_after']['mean']:.4g} with the streams)")


def _train_ftldm(job: TrainJob) -> object:
    from demist.training.ftldm import train_ftldm

    return train_ftldm(job.manifest, job.stage1, job.backbone, job.config, job.out, max_steps=job.max_steps,
                       device=job.device, resume=job.resume, subjects=job.subjects, tensorboard=job.tensorboard)


def _report_ftldm(run) -> str:
    m = run.metrics
    return (f"ftldm: {run.path} (denoising MSE on evaluation patches {m['eval_denoising_mse_backbone']['mean']:.4g}"
            f" for the backbone -> {m['eval_denoising_mse_after']['mean']:.4g} fine-tuned)")


def _load_latent_diffusion(run, **options: Any) -> Any:
    from demist.inference.demist_synthesizer import DemistSynthesizer

    return DemistSynthesizer.from_run(run, **options)


def _ridge() -> ModuleType:
    from demist.baselines import ridge

    return ridge


def _constant() -> ModuleType:
    from demist.baselines import constant

    return constant


def _klgan() -> ModuleType:
    from demist.baselines import klgan

    return klgan


def _vqvae() -> ModuleType:
    from demist.baselines import vqvae

    return vqvae


def _cwdm() -> ModuleType:
    from demist.baselines import cwdm

    return cwdm


def _closed_form(module: Callable[[], ModuleType], trainer: str, synthesizer: str) -> tuple[Callable, Callable]:
    """A baseline fitted in closed form on the CPU: `trainer(manifest, config, out, subjects=…)`."""
    def train(job: TrainJob) -> object:
        return getattr(module(), trainer)(job.manifest, job.config, job.out, subjects=job.subjects)

    def load(run, **options: Any) -> Any:
        return getattr(module(), synthesizer).load(run.path)

    return train, load


def _translation(module: Callable[[], ModuleType], trainer: str, synthesizer: str) -> tuple[Callable, Callable]:
    """A baseline trained in steps by the training loop (`baselines.translation`)."""
    def train(job: TrainJob) -> object:
        return getattr(module(), trainer)(job.manifest, job.config, job.out, max_steps=job.max_steps,
                                          device=job.device, resume=job.resume, subjects=job.subjects,
                                          tensorboard=job.tensorboard)

    def load(run, **options: Any) -> Any:
        return getattr(module(), synthesizer).from_run(run, **options)

    return train, load


LATENT_OPTIONS = ("device", "sampler", "steps", "start_strength", "max_memory", "precision", "anchor_sigma")


def _methods() -> dict[str, Method]:
    streams = "the three streams (cross-attention, ControlNet, LoRA) around the frozen backbone"
    methods = [Method("demist", f"DEMIST: {streams}.", SHARED_RUNS, _demist_trainer(None), _load_latent_diffusion,
                      "demist", load_options=LATENT_OPTIONS, stream_flags=True, report=_report_demist)]
    methods += [Method(f"demist-no-{switch}", f"DEMIST without its {stream} stream ({switch}; ablation).",
                       SHARED_RUNS, _demist_trainer(switch), _load_latent_diffusion, "demist",
                       load_options=LATENT_OPTIONS, ablation_of="demist", report=_report_demist)
                for stream, switch in STREAM_SWITCHES.items()]
    methods.append(Method("ftldm", "FT-LDM: the whole backbone fine-tuned with z_c concatenated to its input.",
                          SHARED_RUNS, _train_ftldm, _load_latent_diffusion, "ftldm", load_options=LATENT_OPTIONS,
                          report=_report_ftldm))
    for name, summary, module, synthesizer in (
            ("ridge", "Voxelwise ridge regression on T1w, FLAIR and smoothed copies (the floor of every deep model).",
             _ridge, "RidgeSynthesizer"),
            ("constant", "The training set's mean PSR everywhere in the brain.", _constant, "ConstantSynthesizer")):
        train, load = _closed_form(module, f"train_{name}", synthesizer)
        methods.append(Method(name, summary, (), train, load, "baseline", iterative=False))
    for name, summary, module, synthesizer, options in (
            ("klgan", "KL-GAN: an AutoencoderKL-style network translating T1w+FLAIR to PSR (L1 + KL + patch "
                      "adversarial).", _klgan, "KLGANSynthesizer", ()),
            ("vqvae", "VQ-VAE: MONAI VQVAE translating T1w+FLAIR to PSR through a quantised latent.", _vqvae,
             "VQVAESynthesizer", ()),
            ("cwdm", "cWDM: conditional wavelet diffusion (3D Haar sub-bands, x0-predicting UNet).", _cwdm,
             "CWDMSynthesizer", ("sampler", "steps"))):
        train, load = _translation(module, f"train_{name}", synthesizer)
        methods.append(Method(name, summary, (), train, load, "baseline", load_options=("device", *options)))
    return {m.name: m for m in methods}


METHODS: dict[str, Method] = _methods()
#: The baselines (deep and closed-form): every method that is neither DEMIST, an ablation of it, nor FT-LDM.
BASELINES = tuple(name for name, m in METHODS.items() if m.stage == "baseline")


def parse_methods(text: str) -> list[Method]:
    """`demist,ridge,...` → methods, in order, each known; the constant predictor is always added."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise DemistError(f"--methods {text!r}: unknown {', '.join(unknown) or '(none given)'}; "
                          f"expected a comma-separated list of {', '.join(METHODS)}")
    if "constant" not in names:
        names.append("constant")  # the floor under the floor: every method must beat it
    return [METHODS[n] for n in dict.fromkeys(names)]


def load_synthesizer(run_dir: str | Path, **options: Any) -> Synthesizer:
    """The method a run directory holds, ready to predict. `options` (sampler, steps, start_strength, device) go to
    the methods that understand them; the others ignore them."""
    from demist.runs import read_run

    run = read_run(run_dir, what="--model")
    # DEMIST with several streams off ("demist-no-crossattn-no-lora") loads as DEMIST does
    method = METHODS.get(run.method) or (METHODS["demist"] if run.method.startswith("demist-no-") else None)
    if method is None or run.stage != method.stage:
        raise DemistError(
            f"--model {run_dir}: holds a {run.stage!r} run of {run.method!r}, which cannot synthesize; "
            "expected the run directory of `demist train demist`, of `demist train ftldm` or of a baseline")
    given = {k: v for k, v in options.items() if v is not None}
    ignored = sorted(k for k in given if k not in method.load_options and k != "device")  # --device: every command's
    if ignored:
        log.warning("--model %s: %s takes no %s; ignored", run_dir, run.method,
                    ", ".join(f"--{k.replace('_', '-')}" for k in ignored))
    return method.load(run, **{k: v for k, v in given.items() if k in method.load_options})


def methods_markdown() -> str:
    """The README's methods table."""
    rows = ["| method | builds on | trains in steps | what it is |", "|---|---|---|---|"]
    rows += [f"| `{m.name}` | {', '.join(m.needs) or '—'} | {'yes' if m.iterative else 'no'} | {m.summary} |"
             for m in METHODS.values()]
    return "\n".join(rows) + "\n"
