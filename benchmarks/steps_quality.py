"""Quality against sampling steps of a trained `tiny` DEMIST run, and tiled against untiled sampling.

On one held-out session of the run's manifest: PSNR of DDIM / DPM-Solver++ samples with 5–50 steps against the
DDPM-1000 sample from the same seed and against the true PSR, then the PSNR between a tiled and an untiled sample of
the whole volume. Also the report helpers `benchmarks/inference_speed.py` shares (it runs this with --model).

    python benchmarks/inference_speed.py --quick --no-timing --model demo/runs/demist
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import numpy as np

QUALITY_STEPS = (5, 10, 20, 50)
UNTILED = 100_000  # a tile edge larger than any volume: `tiling.tiled` then calls the network once


def count_tiles(volume: tuple[int, ...], tile: tuple[int, ...], overlap: float) -> int:
    """Windows `tiling.tiled` runs on `volume`: the tile is cut to the volume, then MONAI's sliding-window grid."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval  # the grid sliding_window_inference itself uses

    size = tuple(min(t, s) for t, s in zip(tile, volume))
    if size == tuple(volume):
        return 1
    interval = _get_scan_interval(volume, size, len(volume), (overlap,) * len(volume))
    return len(dense_patch_slices(volume, size, interval))


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
