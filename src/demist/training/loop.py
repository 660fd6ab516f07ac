"""The one training loop of demist: every stage and baseline is a `Stage` handed to `train`.

A stage says *what* to train: its modules, one `Phase` per optimizer (a GAN has two: generator, discriminator),
each with a loss function returning named terms, and a batch function. The loop does the rest, the same way for
all: HF accelerate for the device, mixed precision and multi-process data parallelism (`accelerate launch`),
gradient accumulation, clipping, a progress bar, `metrics.jsonl`, and checkpoints that resume exactly.

Exact resume without saving data-loader or RNG state: the batch of micro-step `m` on rank `r` is
`stage.batch(step, shard)` with `shard = m * world_size + r`, a pure function, and every RNG is reseeded from
(seed, step, shard, phase) before each loss evaluation (noise, sampled latents, timesteps). So a step computes the
same global batch and the same random draws whether it is spread over processes or accumulated in one
(shards 0 … accumulation × processes − 1), and a resumed run repeats the interrupted one exactly.

Phases run one after another in each step; a phase accumulates all its micro-batches, clips, steps its optimizer
and then clears every gradient, so a generator phase that backpropagates through the discriminator never leaks
gradients into the discriminator's update. Trainable modules must be called through `forward` (a DDP wrapper does
not synchronise other methods); frozen modules (no trainable parameter) are not wrapped and can be called freely.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from demist.atomic import atomic_write
from demist.config_sections import TrainConfig
from demist.devices import resolve_device, resolve_mixed_precision
from demist.errors import DemistError
from demist.runs import METRICS_FILE, TENSORBOARD_DIR
from demist.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from demist.training.ema import ParameterEMA

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Mapping[str, nn.Module], Batch, int, dict[str, Any]], dict[str, torch.Tensor]]


@dataclass
class Phase:
    """One optimizer and the loss it minimises.

    `loss(modules, batch, step, ctx)` returns named scalar terms; the key "loss" is backpropagated, the others are
    logged. `ctx` is a dict shared by the phases of one micro-batch (a generator phase leaves its detached output
    there for the discriminator phase). `active(step)` switches a phase on or off (a discriminator after warm-up).
    """

    name: str
    optimizer: torch.optim.Optimizer
    loss: LossFn
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    active: Callable[[int], bool] = field(default=lambda step: True)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


@dataclass
class Stage:
    """What to train: modules (saved in checkpoints), phases, a pure batch function and a step count."""

    name: str
    modules: dict[str, nn.Module]
    phases: list[Phase]
    batch: Callable[[int, int], Batch]  # (step, shard) -> tensors on the CPU
    steps: int
    grad_clip: float | None = 1.0
    ema_decay: float = 0.0  # > 0: the run keeps an exponential moving average of its trainable parameters
    find_unused_parameters: bool = False  # for DDP when a trainable parameter may get no gradient in a step


@dataclass
class TrainResult:
    """What `train` returns: the trained modules (unwrapped) and how they were trained."""

    modules: dict[str, nn.Module]
    is_main_process: bool
    steps: int
    processes: int
    mixed_precision: str
    device: str


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup_fraction: float = 0.05,
                  final_fraction: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_fraction` of the steps, then cosine decay to `final_fraction` of the base lr."""
    warmup = max(1, int(round(warmup_fraction * steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int, *keys: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from `seed` and further integers (step, shard, phase)."""
    from accelerate.utils import set_seed

    set_seed(int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0]))


def _accelerator(device: str, mixed_precision: str, find_unused_parameters: bool):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    return Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision, kwargs_handlers=[ddp])


def _release_accelerator() -> None:
    """Forget accelerate's process-wide settings so the next stage in this process may use another precision."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()  # keeps the process group (PartialState) of a multi-process launch
    GradientState._reset_state()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line that is not a complete record."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """`metrics.jsonl` (one JSON object per logged step) and, if asked, TensorBoard; main process only."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool, tensorboard: bool) -> None:
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop what a killed run logged after its last checkpoint (and a torn last line)
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            atomic_write(self.path, "".join(f"{line}\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise DemistError("--tensorboard: the tensorboard package is not installed; "
                                  "expected `pip install tensorboard` or no --tensorboard") from None
            self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR))

    def write(self, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(stage: Stage, run_dir: str | Path, train_cfg: TrainConfig, *, device: str = "auto",
          resume: bool = False, weights_metadata: Mapping[str, str] | None = None,
          tensorboard: bool = False) -> TrainResult:
    """Train `stage` for `stage.steps` steps, checkpointing into `run_dir`; resumes from its last checkpoint."""
    run_dir = Path(run_dir)
    torch_device = resolve_device(device)
    precision = resolve_mixed_precision(train_cfg.mixed_precision, torch_device)
    accelerator = _accelerator(torch_device.type, precision, stage.find_unused_parameters)
    try:
        return _train(stage, run_dir, train_cfg, accelerator, resume, dict(weights_metadata or {}), tensorboard)
    finally:
        _release_accelerator()


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _checkpoint_to_resume(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start at step 0); refuses to overwrite one without `resume`."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None and not resume:
        raise DemistError(f"{run_dir}: already holds a training checkpoint; pass --resume to continue it, "
                          "or choose another output directory")
    if resume and checkpoint is None:
        logger.info("%s: no checkpoint to resume from; starting at step 0", run_dir)
    return checkpoint


def _train(stage: Stage, run_dir: Path, train_cfg: TrainConfig, accelerator, resume: bool,
           metadata: dict[str, str], tensorboard: bool) -> TrainResult:
    from tqdm.auto import tqdm

    # Modules with trainable parameters are wrapped (DDP when multi-process); frozen ones are only moved.
    modules = {name: accelerator.prepare_model(m) if _trainable(m) else m.to(accelerator.device)
               for name, m in stage.modules.items()}
    optimizers = [accelerator.prepare_optimizer(phase.optimizer) for phase in stage.phases]
    identity = {"stage": stage.name, "total_steps": stage.steps, "seed": train_cfg.seed,
                "config": metadata.get("config", ""), "data": metadata.get("data")}
    checkpoint = _checkpoint_to_resume(run_dir, resume)
    ema = ParameterEMA(stage.modules, stage.ema_decay) if stage.ema_decay > 0 else None
    start = _restore(checkpoint, stage, optimizers, accelerator, identity, ema) if checkpoint is not None else 0

    log = MetricsLog(run_dir, start, accelerator.is_main_process, tensorboard)
    bar = tqdm(total=stage.steps, initial=start, desc=stage.name, disable=not accelerator.is_local_main_process,
               dynamic_ncols=True)
    window: dict[str, Any] = {"time": time.perf_counter(), "samples": 0, "terms": {}}
    for step in range(start, stage.steps):
        terms, samples = _train_step(stage, step, modules, optimizers, accelerator, train_cfg)
        if ema is not None:
            ema.update(step)
        window["samples"] += samples
        for key, value in terms.items():  # (sum, count): a phase may be active in only some steps
            total, count = window["terms"].get(key, (0.0, 0))
            window["terms"][key] = (total + value, count + 1)
        bar.update(1)
        done = step + 1
        if done % train_cfg.log_every == 0 or done == stage.steps:
            _log_window(accelerator, window, done, stage, log, bar)
        if done % train_cfg.checkpoint_every == 0 or done == stage.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                state = {**identity, "processes": accelerator.num_processes,
                         "optimizers": {p.name: o.state_dict() for p, o in zip(stage.phases, optimizers)},
                         "schedulers": {p.name: p.scheduler.state_dict() for p in stage.phases if p.scheduler},
                         "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                         "ema": ema.state_dict() if ema is not None else None}
                save_checkpoint(run_dir, done, stage.modules, state, metadata)
            accelerator.wait_for_everyone()
    bar.close()
    log.close()
    if ema is not None:  # the run keeps the averaged weights (the checkpoint keeps both, for an exact resume)
        ema.copy_to_parameters()
    accelerator.wait_for_everyone()
    return TrainResult(modules=dict(stage.modules), is_main_process=accelerator.is_main_process, steps=stage.steps,
                       processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision,
                       device=str(accelerator.device))


def _train_step(stage: Stage, step: int, modules: dict[str, nn.Module], optimizers: list, accelerator,
                train_cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], int]:
    """One optimisation step of every active phase; returns the loss terms (detached) and the global sample count."""
    world, accumulation = accelerator.num_processes, train_cfg.gradient_accumulation
    wrapped = [m for m in modules.values() if _trainable(m)]
    shards = [micro * world + accelerator.process_index for micro in range(accumulation)]
    batches = [{k: v.to(accelerator.device) for k, v in stage.batch(step, s).items()} for s in shards]
    contexts: list[dict[str, Any]] = [{} for _ in shards]
    terms: dict[str, torch.Tensor] = {}
    for index, (phase, optimizer) in enumerate(zip(stage.phases, optimizers)):
        if not phase.active(step):
            continue
        for micro, (batch, ctx) in enumerate(zip(batches, contexts)):
            seed_everything(train_cfg.seed, step, shards[micro], index)
            with contextlib.ExitStack() as stack:
                if micro < accumulation - 1:  # synchronise gradients across processes on the last one only
                    for module in wrapped:
                        stack.enter_context(accelerator.no_sync(module))
                with accelerator.autocast():
                    out = phase.loss(modules, batch, step, ctx)
                accelerator.backward(out["loss"] / accumulation)
            for key, value in out.items():
                name = phase.name if key == "loss" else key
                terms[name] = terms.get(name, 0.0) + value.detach().float() / accumulation
        if stage.grad_clip:
            accelerator.clip_grad_norm_(phase.params, stage.grad_clip)
        optimizer.step()
        if phase.scheduler is not None:
            phase.scheduler.step()
        for module in wrapped:  # clear every gradient, including those this phase left in other phases' modules
            module.zero_grad(set_to_none=True)
    samples = sum(int(next(iter(b.values())).shape[0]) for b in batches) * world
    return terms, samples


def _restore(checkpoint: Path, stage: Stage, optimizers: list, accelerator, identity: dict[str, Any],
             ema: ParameterEMA | None) -> int:
    """Load weights, optimizer, scheduler, scaler and EMA states; returns the step to continue from."""
    state = load_checkpoint(checkpoint, stage.modules)
    for key, value in identity.items():
        if key == "data" and (key not in state or value is None):  # not recorded (older checkpoints, some stages)
            continue
        if state.get(key) != value:
            what = "sessions or parent runs" if key == "data" else key
            raise DemistError(f"{checkpoint}: was written with a different {what} than this run's; expected the same "
                              "config, seed, --max-steps, manifest sessions and parent runs to resume")
    for phase, optimizer in zip(stage.phases, optimizers):
        optimizer.load_state_dict(state["optimizers"][phase.name])
        if phase.scheduler is not None:
            phase.scheduler.load_state_dict(state["schedulers"][phase.name])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if state.get("ema") is None:
            raise DemistError(f"{checkpoint}: holds no parameter averages, but this run keeps an EMA; "
                              "expected the same config to resume")
        ema.load_state_dict(state["ema"])
    if state.get("processes") != accelerator.num_processes:
        logger.warning("resuming with %d processes where the checkpoint had %s: same global batch, other rounding",
                       accelerator.num_processes, state.get("processes"))
    logger.info("resuming %s from step %d (%s)", stage.name, state["step"], checkpoint)
    return int(state["step"])


def _log_window(accelerator, window: dict[str, Any], step: int, stage: Stage, log: MetricsLog, bar) -> None:
    """Average the terms since the last log over steps and processes; write them and update the progress bar."""
    names = sorted(window["terms"])
    values = torch.stack([window["terms"][n][0] / window["terms"][n][1] for n in names] or [torch.zeros(())])
    values = values.to(accelerator.device)
    values = accelerator.reduce(values, reduction="mean")  # a collective: every rank logs at the same steps
    elapsed = time.perf_counter() - window["time"]
    record: dict[str, float] = {"step": step, "samples_per_s": window["samples"] / max(elapsed, 1e-9)}
    record.update({n: float(v) for n, v in zip(names, values.tolist())})
    for phase in stage.phases:
        record[f"lr/{phase.name}"] = phase.optimizer.param_groups[0]["lr"]
    log.write(record)
    bar.set_postfix({n: f"{record[n]:.4g}" for n in names[:4]} | {"samples/s": f"{record['samples_per_s']:.2f}"})
    window.update(time=time.perf_counter(), samples=0, terms={})
