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

FULL_1MM = (160, 192, 160)  # a whole brain on the 1 mm model grid
QUICK_2MM = (80, 96, 80)  # the same brain on the tiny preset's 2 mm grid
PROJECTED_STEPS = (1, 2, 4, 10, 25, 50)  # 1, 2, 4: distilled students (`demist train distill --student-steps`)
NAIVE_STEPS = 50
QUALITY_STEPS = (5, 10, 20, 50)
PARTS = ("encode", "step", "decode")
UNTILED = 100_000  # a tile edge larger than any volume: `tiling.tiled` then calls the network once
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


def count_tiles(volume: tuple[int, ...], tile: tuple[int, ...], overlap: float) -> int:
    """Windows `tiling.tiled` runs on `volume`: the tile is cut to the volume, then MONAI's sliding-window grid."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval  # the grid sliding_window_inference itself uses

    size = tuple(min(t, s) for t, s in zip(tile, volume))
    if size == tuple(volume):
        return 1
    interval = _get_scan_interval(volume, size, len(volume), (overlap,) * len(volume))
    return len(dense_patch_slices(volume, size, interval))


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


def fmt_s(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.3g} s"
    return f"{seconds / 60:.3g} min" if seconds < 3600 else f"{seconds / 3600:.3g} h"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


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


# --- quality against steps (a trained tiny run) ---------------------------------------------------------------------


def held_out_session(run, key: str | None):
    """The named session, else the first manifest session the run did not train on (else the first at all)."""
    from pathlib import Path

    from demist.data.manifest import load_manifest
    from demist.errors import DemistError

    manifest = run.training.get("manifest")
    if not manifest or not Path(manifest).is_file():
        raise DemistError(f"--model {run.path}: its training manifest {manifest!r} is missing; expected the CSV")
    records = load_manifest(manifest)
    if key is not None:
        chosen = [r for r in records if r.key == key]
        if not chosen:
            raise DemistError(f"--session {key}: not in {manifest}; expected one of {[r.key for r in records]}")
        return chosen[0], key in set(run.training.get("sessions") or [])
    trained = set(run.training.get("sessions") or [])
    unseen = [r for r in records if r.key not in trained]
    return (unseen[0], False) if unseen else (records[0], True)


def brain_crop(session, size: int):
    """The session cut to a `size`³ box (each axis at most the volume) around the centre of its brain mask."""
    shape = np.asarray(session.brain.shape)
    edge = np.minimum(size, shape)
    centre = np.round(np.argwhere(session.brain).mean(axis=0)).astype(int)
    start = np.clip(centre - edge // 2, 0, shape - edge)
    window = tuple(slice(int(a), int(a + e)) for a, e in zip(start, edge))
    arrays = {k: getattr(session, k)[window] for k in ("t1w", "flair", "brain", "psr", "lesion", "wm")
              if getattr(session, k) is not None}
    return dataclasses.replace(session, **arrays)


def quality(run_dir: str, session_key: str | None, seed: int, crop: int) -> None:
    from demist.data.preprocess import prepare_session
    from demist.evaluation.metrics import image_metrics
    from demist.inference.demist_synthesizer import DemistSynthesizer
    from demist.runs import read_run

    run = read_run(run_dir, what="--model")
    synth = DemistSynthesizer.from_run(run, device="cpu")
    record, seen = held_out_session(run, session_key)
    whole_session = prepare_session(record, synth.config.data, need_target=record.psr is not None)
    factor = 2 ** (len(synth.config.autoencoder.channels) - 1)
    multiple = synth.config.data.divisor
    if crop < 0 or crop % multiple:
        raise SystemExit(f"--quality-crop {crop}: expected 0 (whole volume) or a positive multiple of {multiple}")
    session = brain_crop(whole_session, crop) if crop else whole_session
    tiled_cfg = synth.config
    whole = tiled_cfg.replace(sampling=dataclasses.replace(tiled_cfg.sampling, tile_size=(UNTILED,) * 3))

    def sample(sampler: str, steps: int, cfg=tiled_cfg, on=session) -> tuple[np.ndarray, float]:
        synth.sampler, synth.steps, synth.config = sampler, steps, cfg
        print(f"  sampling {sampler}-{steps}{'' if cfg is tiled_cfg else ' untiled'} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        mean, _ = synth.predict(on, samples=1, seed=seed, progress=True)
        return mean, time.perf_counter() - start

    def psnr(a: np.ndarray, b: np.ndarray, brain: np.ndarray = session.brain) -> str:
        return f"{image_metrics(a, b, brain)['psnr']:.2f}"

    reference, reference_s = sample("ddpm", synth.schedule.num_train_timesteps)
    truth = session.psr
    region = (f"a {'×'.join(map(str, session.brain.shape))} brain-centred crop of its "
              f"{'×'.join(map(str, whole_session.brain.shape))}" if crop else f"its {session.brain.shape}")
    print(f"\nQuality against steps: {run.path}, session {record.key}, {region} {synth.config.data.spacing:g} mm grid"
          f"{' (seen in training: no held-out session)' if seen else ' (held out)'}, seed {seed}; "
          f"PSNR (dB) of PSR/psr_range inside the brain")
    rows = [["ddpm", "1000", "—", psnr(reference, truth) if truth is not None else "n/a", fmt_s(reference_s)]]
    outputs = {}
    for sampler in ("ddim", "dpm++"):
        for steps in QUALITY_STEPS:
            outputs[(sampler, steps)], seconds = sample(sampler, steps)
            out = outputs[(sampler, steps)]
            rows.append([sampler, str(steps), psnr(out, reference), psnr(out, truth) if truth is not None else "n/a",
                         fmt_s(seconds)])
    print_table(["sampler", "steps", "vs DDPM-1000", "vs true PSR", "time"], rows)

    default = (tiled_cfg.sampling.sampler, tiled_cfg.sampling.steps)
    tiled = outputs.get(default) if not crop else None
    if tiled is None:
        tiled, _ = sample(*default, on=whole_session)
    untiled, _ = sample(*default, cfg=whole, on=whole_session)
    session = whole_session
    latent = tuple(s // factor for s in session.brain.shape)
    tiles = count_tiles(latent, tiled_cfg.sampling.tile_size, tiled_cfg.sampling.tile_overlap)
    print(f"Tiled ({'×'.join(map(str, tiled_cfg.sampling.tile_size))} latent voxels, overlap "
          f"{tiled_cfg.sampling.tile_overlap:g}: {tiles} tile{'s' * (tiles != 1)} on the "
          f"{'×'.join(map(str, latent))} latent) vs untiled, "
          f"{default[0]}-{default[1]}, same seed: PSNR {psnr(tiled, untiled, session.brain)} dB; "
          f"max |difference| {np.abs(tiled - untiled)[session.brain].max():.4f}")


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
