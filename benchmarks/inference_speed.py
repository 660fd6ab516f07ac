"""How long does DEMIST take to synthesize one whole volume on this CPU, and how much memory does it need?

For each architecture (`tiny`, `paper`; random weights: timing does not depend on them) and two inference paths:

- demist: what `DemistSynthesizer` does — SDPA attention, bf16 autocast and channels-last tensors where the CPU has
  native bf16, LoRA merged, no gradients, every network applied in overlapping Gaussian-blended tiles
  (`sampling.tile_size`, `tile_overlap`);
- naive: a MONAI `ControlNetLatentDiffusionInferer`-style run — fp32, plain (non-SDPA) attention, LoRA unmerged,
  each network on the whole volume at once, DDIM-50.

it times the condition encoder, one sampling step (ControlNet + UNet + cross-attention) and the PSR decoder, and
projects the total for 1, 2 and 4 (distilled students), 10, 25 and 50 steps rather than sampling for hours. The
demist path times one tile (1 warm-up call, then 2 timed calls) and multiplies by the number of tiles MONAI's sliding
window visits; the naive path times the whole volume (for `paper` one call, no warm-up: it takes minutes). Every
measurement runs in a fresh process (multiprocessing spawn) holding all three networks, and reports that process's
peak resident memory (`ru_maxrss`), so peaks never mix; a naive call whose estimated memory exceeds --max-gib is
skipped.

With --model RUN (a trained tiny DEMIST run) it also measures quality against steps on one held-out session of the
run's manifest — PSNR of DDIM / DPM-Solver++ samples with 5–50 steps against the DDPM-1000 sample from the same
seed, and against the true PSR — and the PSNR between a tiled and an untiled sample of the whole volume. The curve is
measured on the whole volume by default: synthesized alone, a brain-centred crop of one sampling tile
(--quality-crop N) scored 6 dB below the same region cut from the whole-volume sample (docs/inference.md), so a crop
is cheaper but does not measure what synthesis does.

    python benchmarks/inference_speed.py --archs tiny,paper
    python benchmarks/inference_speed.py --quick --model demo/runs/demist
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
import torch

from demist.inference.memory import GIB, call_bytes
from steps_quality import UNTILED, count_tiles, fmt_s, print_table, quality

FULL_1MM = (160, 192, 160)  # a whole brain on the 1 mm model grid
QUICK_2MM = (80, 96, 80)  # the same brain on the tiny preset's 2 mm grid
PROJECTED_STEPS = (1, 2, 4, 10, 25, 50)  # 1, 2, 4: distilled students (`demist train distill --student-steps`)
NAIVE_STEPS = 50
PARTS = ("encode", "step", "decode")
STEP_TIMESTEPS = (999, 500, 250)  # the warm-up and the two timed steps


@dataclass(frozen=True)
class Job:
    arch: str
    path: str  # "demist" or "naive"
    part: str  # "encode", "step" or "decode"
    volume: tuple[int, int, int]  # image voxels on the model grid
    repeats: int
    warmup: bool
    max_gib: float
    validate: bool  # also run the real tiled call on the whole volume once (cheap architectures only)


@dataclass
class Measurement:
    job: Job
    input_shape: tuple[int, ...] = ()
    calls: int = 0  # network calls per volume (tiles)
    seconds: tuple[float, ...] = ()  # wall clock per timed call
    cpu_seconds: tuple[float, ...] = ()  # CPU time of all threads per timed call: less sensitive to a shared CPU
    peak_gib: float = math.nan
    estimate_gib: float = math.nan
    whole_volume_s: tuple[float, float] | None = None  # the real tiled call (wall, CPU), when validated
    skipped: str | None = None

    @property
    def per_volume_s(self) -> float:
        return float(np.mean(self.seconds)) * self.calls if self.seconds else math.nan

    @property
    def per_volume_cpu_s(self) -> float:
        return float(np.mean(self.cpu_seconds)) * self.calls if self.cpu_seconds else math.nan


# --- one measurement, in its own process -----------------------------------------------------------------------------


def build_synthesizer(arch: str, ours: bool):
    """A `DemistSynthesizer` with randomly initialised networks, set up as the demist or the naive path."""
    from demist.config import load_config
    from demist.diffusion.schedule import NoiseSchedule
    from demist.inference.demist_synthesizer import DemistSynthesizer
    from demist.inference.memory import DEFAULT_MAX_MEMORY_GIB
    from demist.models.autoencoder import build_autoencoder
    from demist.models.backbone import build_unet
    from demist.models.demist_net import DemistNet

    cfg = load_config(arch)
    if not ours:
        cfg = cfg.replace(sampling=dataclasses.replace(cfg.sampling, tile_size=(UNTILED,) * 3))
    channels = cfg.autoencoder.latent_channels
    torch.manual_seed(0)
    net = DemistNet(build_unet(cfg.unet, channels, use_flash_attention=ours), cfg.demist, cfg.unet, channels)
    if ours:
        net.merge_lora()
    psr_ae, cond_ae = build_autoencoder(cfg.autoencoder, 1), build_autoencoder(cfg.autoencoder, 2)
    for module in (net, psr_ae, cond_ae):
        module.eval().requires_grad_(False)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    return DemistSynthesizer(method="demist", config=cfg, net=net, psr_autoencoder=psr_ae, cond_autoencoder=cond_ae,
                             schedule=schedule, latent_scale_factor=1.0, sampler="ddim", steps=NAIVE_STEPS,
                             device=torch.device("cpu"), use_bf16=ours,
                             max_memory_gib=DEFAULT_MAX_MEMORY_GIB if ours else math.inf)


def resident_gib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / GIB


def part_call(synth, part: str, spatial: tuple[int, ...], generator: torch.Generator) -> Callable[[int], object]:
    """One call of `part` on a random input, through the synthesizer's own (tiled) code, or for the naive path (fp32)
    through the autoencoder itself on the whole input; its argument is t."""
    channels = synth.config.autoencoder.latent_channels
    naive = not synth.use_bf16
    if part == "encode":
        image = torch.rand((1, 2, *spatial), generator=generator)
        return (lambda t: synth.cond_autoencoder.encode(image)) if naive else (lambda t: synth.encode_condition(image))
    latent = torch.randn((1, channels, *spatial), generator=generator)
    if part == "decode":
        return (lambda t: synth.psr_autoencoder.decode(latent)) if naive else (lambda t: synth.decode(latent))
    factor = 2 ** (len(synth.config.autoencoder.channels) - 1)
    image = torch.rand((1, 2, *(factor * s for s in spatial)), generator=generator)
    model = synth.denoiser(torch.randn((1, channels, *spatial), generator=generator), synth.image_hint(image))
    return lambda t: model(latent, torch.tensor([t]))


def timed(call: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU of all threads) seconds of one call."""
    start, start_cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - start, time.process_time() - start_cpu


def measure(job: Job) -> Measurement:
    """Build the networks, then time one part of inference (runs in a fresh process)."""
    from demist.inference.demist_synthesizer import AUTOENCODER_OVERLAP

    ours = job.path == "demist"
    synth = build_synthesizer(job.arch, ours)
    cfg = synth.config
    factor = 2 ** (len(cfg.autoencoder.channels) - 1)
    full = job.volume if job.part == "encode" else tuple(s // factor for s in job.volume)
    # the tiles the synthesizer itself chooses (memory.unet_tile, memory.autoencoder_window) and their overlap
    if job.part == "step":
        tile, overlap = synth._latent_tile(full), cfg.sampling.tile_overlap
    else:
        tile, overlap = synth._window(job.part, full), AUTOENCODER_OVERLAP
    spatial = tuple(min(t, s) for t, s in zip(tile, full)) if ours else full
    result = Measurement(job, input_shape=(2 if job.part == "encode" else cfg.autoencoder.latent_channels, *spatial),
                         calls=count_tiles(full, tile, overlap) if ours else 1)
    result.estimate_gib = resident_gib() + call_bytes(cfg, job.part, spatial, plain_attention=not ours) / GIB
    if result.estimate_gib > job.max_gib:
        result.skipped = f"estimated {result.estimate_gib:.1f} GiB > --max-gib {job.max_gib:g}"
        return result
    generator = torch.Generator().manual_seed(0)
    call = part_call(synth, job.part, spatial, generator)
    with torch.no_grad():
        if job.warmup:
            call(STEP_TIMESTEPS[0])
        times = [timed(lambda: call(t)) for t in STEP_TIMESTEPS[1:1 + job.repeats]]
        result.seconds, result.cpu_seconds = tuple(w for w, _ in times), tuple(c for _, c in times)
        result.peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # kB on Linux
        if job.validate and result.calls > 1:  # the real tiled call on the whole volume, once
            whole = part_call(synth, job.part, full, generator)
            result.whole_volume_s = timed(lambda: whole(STEP_TIMESTEPS[1]))
    return result


def run_isolated(job: Job) -> Measurement:
    """`measure(job)` in a fresh spawned process, so its peak memory is its own."""
    print(f"  measuring {job.arch} {job.path} {job.part} ...", file=sys.stderr, flush=True)
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(measure, job).result()
    except BrokenProcessPool:
        return Measurement(job, skipped="the process died (out of memory?)")


# --- report -------------------------------------------------------------------------------------------------------


def path_label(path: str, bf16: bool) -> str:
    if path == "demist":
        return f"demist ({'bf16, channels-last' if bf16 else 'fp32'}, SDPA, tiled, LoRA merged)"
    return "naive (fp32, plain attention, untiled)"


def peak_of(measurements: list[Measurement]) -> str:
    peaks = [m.peak_gib for m in measurements if math.isfinite(m.peak_gib)]
    return f"{max(peaks):.2f}" if peaks else "n/a"


def both(wall: float, cpu: float) -> str:
    return f"{fmt_s(wall)} / {fmt_s(cpu)}"


def report(results: dict[tuple[str, str, str], Measurement], archs: list[str], bf16: bool) -> None:
    print("\nMeasured, per part (one fresh process each). Times are wall / CPU (all threads); s/call lists the timed "
          "calls (mean used); 'calls' = tiles per volume")
    rows = []
    for (arch, path, part), m in results.items():
        shape = "×".join(map(str, m.input_shape)) if m.input_shape else "?"
        if m.skipped:
            rows.append([arch, path, part, shape, str(m.calls), "skipped: " + m.skipped, "", "", "", "",
                         f"{m.estimate_gib:.1f}"])
            continue
        calls = ", ".join(f"{w:.3g}/{c:.3g}" for w, c in zip(m.seconds, m.cpu_seconds))
        real = "" if m.whole_volume_s is None else both(*m.whole_volume_s)
        rows.append([arch, path, part, shape, str(m.calls), calls + ("" if m.job.warmup else " (no warm-up)"),
                     both(m.per_volume_s, m.per_volume_cpu_s), real, f"{m.peak_gib:.2f}", f"{m.estimate_gib:.1f}"])
    print_table(["arch", "path", "part", "input per call", "calls", "s/call (wall/CPU)", "per volume",
                 "real tiled call", "peak GiB", "est. GiB"], rows)

    print(f"\nProjected whole-volume synthesis, one sample: encode + steps × step + decode (wall / CPU); speed-up = "
          f"naive DDIM-{NAIVE_STEPS} total / demist total")
    rows = []
    for arch in archs:
        totals = {}
        for path in ("naive", "demist"):
            parts = [results[(arch, path, p)] for p in PARTS]
            wall = {p: m.per_volume_s for p, m in zip(PARTS, parts)}
            cpu = {p: m.per_volume_cpu_s for p, m in zip(PARTS, parts)}
            for steps in ((NAIVE_STEPS,) if path == "naive" else PROJECTED_STEPS):
                total = (wall["encode"] + steps * wall["step"] + wall["decode"],
                         cpu["encode"] + steps * cpu["step"] + cpu["decode"])
                totals.setdefault(path, total)
                naive = totals["naive"]
                speedup = " / ".join(f"{n / t:.1f}×" if math.isfinite(n / t) else "n/a" for n, t in zip(naive, total))
                sampling = f"DDIM-{steps}" if path == "naive" else f"{steps} steps"
                rows.append([arch, path_label(path, bf16), sampling, both(wall["step"], cpu["step"]),
                             both(wall["encode"] + wall["decode"], cpu["encode"] + cpu["decode"]), both(*total),
                             speedup, peak_of(parts)])
    print_table(["arch", "path", "sampling", "per step", "encode + decode", "total", "speed-up", "peak GiB"], rows)


# --- command line ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="tiny,paper", help="comma-separated presets to time (tiny, paper)")
    parser.add_argument("--quick", action="store_true", help="tiny only, on the 2 mm volume (80×96×80)")
    parser.add_argument("--volume", type=int, nargs=3, default=None, help="image voxels (default 160 192 160)")
    parser.add_argument("--max-gib", type=float, default=16.0, help="skip calls estimated to need more memory")
    parser.add_argument("--model", default=None, help="a trained tiny DEMIST run: also quality against steps")
    parser.add_argument("--session", default=None, help="manifest session for --model (default: a held-out one)")
    parser.add_argument("--quality-crop", type=int, default=0,
                        help="image voxels per axis of a brain-centred crop for the steps curve (default 0: the "
                        "whole volume, what synthesis does)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-timing", action="store_true", help="skip the timing part (only --model's quality)")
    args = parser.parse_args(argv)
    archs = ["tiny"] if args.quick else [a.strip() for a in args.archs.split(",") if a.strip()]
    volume = tuple(args.volume) if args.volume else (QUICK_2MM if args.quick else FULL_1MM)
    bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"demist inference speed: volume {'×'.join(map(str, volume))} image voxels; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {cpu}; native bf16: {'yes' if bf16 else 'no (demist path runs fp32)'}")
    print("load average (1, 5, 15 min) at start: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    if not args.no_timing:
        results: dict[tuple[str, str, str], Measurement] = {}
        for arch in archs:
            for path in ("demist", "naive"):
                slow = path == "naive" and arch != "tiny"
                for part in PARTS:
                    job = Job(arch, path, part, volume, repeats=1 if slow else 2, warmup=not slow,
                              max_gib=args.max_gib, validate=arch == "tiny")
                    results[(arch, path, part)] = run_isolated(job)
        report(results, archs, bf16)
    if args.model:
        quality(args.model, args.session, args.seed, args.quality_crop)
    else:
        print("\nQuality against steps: pending (no --model run given).")
    print("load average (1, 5, 15 min) at end: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
