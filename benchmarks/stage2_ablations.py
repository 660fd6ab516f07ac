"""Which conditioning stream matters? Tiny DEMIST and its three ablations on a 2 mm phantom cohort.

Generates a cohort (or reuses it), holds out subjects, trains one Stage 1 and one backbone on the others, then
DEMIST with all streams and without cross-attention, ControlNet or LoRA (same Stage 1, backbone, seed and steps).
Each is sampled on the held-out sessions with `DemistSynthesizer` (the `demist synthesize` path: DDIM, tiled) and
scored inside the brain on the model grid (PSR / psr_range, data range 1). Two reference rows bracket the numbers:
the voxelwise ridge floor, and the Stage-1 ceiling (the PSR autoencoder decoding the true latent: no sampler can
beat its own decoder). Every finished step is reused when rerun with the same --out.

    python benchmarks/stage2_ablations.py --out /tmp/ablations                 # the tiny preset's budgets
    python benchmarks/stage2_ablations.py --out /tmp/smoke --subjects 4 --held-out 1 --max-steps 5 --sampling-steps 2
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from demist.config import load_config
from demist.data.manifest import load_manifest, select_subjects
from demist.data.phantom import generate_cohort
from demist.data.preprocess import prepare_session
from demist.workflows.demo import split_subjects
from demist.evaluation.metrics import image_metrics
from demist.inference.demist_synthesizer import DemistSynthesizer
from demist.models.autoencoder import reconstruct
from demist.runs import read_run
from demist.training.backbone import load_stage1, train_backbone
from demist.training.stage1 import train_stage1
from demist.training.stage2 import train_demist

VARIANTS = {"demist": {}, "demist-no-crossattn": {"crossattn": False},
            "demist-no-controlnet": {"controlnet": False}, "demist-no-lora": {"lora": False}}
METRICS = ("psnr", "ssim", "mse")


def once(name: str, done: Path, action) -> float:
    """Run `action` unless `done` exists; returns the minutes it took (NaN when reused)."""
    if done.exists():
        print(f"{name}: reused ({done.parent})")
        return float("nan")
    start = time.perf_counter()
    action()
    minutes = (time.perf_counter() - start) / 60
    print(f"{name}: trained in {minutes:.1f} min")
    return minutes


def scores(predict, sessions) -> dict[str, tuple[float, float]]:
    """Mean and SD over sessions of each metric, inside the brain."""
    values = {m: [] for m in METRICS}
    for session in sessions:
        result = image_metrics(predict(session) * session.brain, session.psr, session.brain)
        for m in METRICS:
            values[m].append(result[m])
    return {m: (float(np.mean(v)), float(np.std(v))) for m, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--subjects", type=int, default=12)
    parser.add_argument("--held-out", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--max-steps", type=int, default=None, help="Cap Stage 1 and the backbone.")
    parser.add_argument("--stage2-steps", type=int, default=None, help="Steps of each DEMIST variant "
                        "(default: --max-steps, else the config's).")
    parser.add_argument("--sampling-steps", type=int, default=None, help="DDIM steps (default: the config's).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)

    cfg = load_config(args.config)
    manifest = args.out / "cohort" / "manifest.csv"
    if not manifest.exists():
        generate_cohort(args.out / "cohort", args.subjects, spacing=cfg.data.spacing, seed=args.seed)
    train_subjects, test_subjects = split_subjects(manifest, args.held_out, args.seed)
    records = load_manifest(manifest)
    runs = args.out / "runs"
    minutes = {"stage1": once("stage1", runs / "stage1" / "stage1" / "run.json", lambda: train_stage1(
        select_subjects(records, train_subjects), cfg, runs / "stage1", max_steps=args.max_steps, device="cpu"))}
    stage1 = runs / "stage1" / "stage1"
    minutes["backbone"] = once("backbone", runs / "backbone" / "run.json", lambda: train_backbone(
        manifest, stage1, cfg, runs / "backbone", max_steps=args.max_steps, device="cpu", subjects=train_subjects))
    stage2_steps = args.stage2_steps or args.max_steps
    for name, flags in VARIANTS.items():
        minutes[name] = once(name, runs / name / "run.json", lambda: train_demist(
            manifest, stage1, runs / "backbone", cfg, runs / name, max_steps=stage2_steps, device="cpu",
            subjects=train_subjects, **flags))

    held_out = [prepare_session(r, cfg.data) for r in select_subjects(records, test_subjects)]
    print(f"\n{len(held_out)} held-out sessions of {len(test_subjects)} subjects; inside the brain, PSR/"
          f"{cfg.data.psr_range} (data range 1); mean ± SD over sessions")
    print(f"{'method':24s} {'PSNR dB':>14s} {'SSIM':>14s} {'MSE':>18s} {'train min':>10s} {'sample s':>9s}")

    def row(name: str, result: dict[str, tuple[float, float]], train_min: float, sample_s: float) -> None:
        psnr, ssim, mse = (result[m] for m in METRICS)
        print(f"{name:24s} {psnr[0]:7.2f} ± {psnr[1]:4.2f} {ssim[0]:7.3f} ± {ssim[1]:4.3f} "
              f"{mse[0]:9.5f} ± {mse[1]:6.5f} {train_min:10.1f} {sample_s:9.1f}")

    from demist.baselines.ridge import fit_ridge

    train_sessions = [prepare_session(r, cfg.data) for r in select_subjects(records, train_subjects)]
    ridge = fit_ridge(train_sessions, cfg, seed=args.seed)
    row("ridge (floor)", scores(lambda s: ridge.predict(s)[0], held_out), float("nan"), 0.0)
    psr_ae = load_stage1(stage1).psr_autoencoder
    ceiling = lambda s: reconstruct(  # noqa: E731
        psr_ae, torch.from_numpy(s.psr)[None, None], cfg.data.patch_size).numpy()[0, 0]
    row("stage-1 AE (ceiling)", scores(ceiling, held_out), minutes["stage1"], 0.0)
    for name in VARIANTS:
        synthesizer = DemistSynthesizer.from_run(read_run(runs / name), steps=args.sampling_steps, device="cpu")
        start = time.perf_counter()
        result = scores(lambda s: synthesizer.predict(s, seed=args.seed)[0], held_out)
        row(name, result, minutes[name], (time.perf_counter() - start) / len(held_out))


if __name__ == "__main__":
    main()
