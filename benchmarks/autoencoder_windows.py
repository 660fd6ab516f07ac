"""Does a PSR autoencoder depend on the window it runs in? Whole held-out volumes through several encode/decode paths.

For each PSR autoencoder run given (`--runs`, e.g. the embedded prior's and a `--pilot` trained here) and each
held-out session of a finished demo, the true PSR goes through E_PSR → D_PSR along several paths:

- windowed latent: encoded in overlapping windows of the training patch size, latents blended, decoded in
  windows (what Stage 2 trains on and what synthesis decodes);
- per window: each window encoded and decoded alone, the images blended (never a single latent volume);
- larger windows, more overlap, and the whole volume at once.

Printed per path: PSNR and SSIM inside the brain (data range 1: PSR / psr_range), the mean error inside the brain
(a brightness bias), and the seconds per session. An autoencoder that does not depend on its window scores the same
on every path. With `--pilot NAME:STEPS:JSON`, a PSR autoencoder is first trained on the demo's training subjects with
the `[autoencoder]` keys of JSON overriding the preset's (e.g. `channel:1000:{"norm":"channel"}`).

    python benchmarks/autoencoder_windows.py --demo demo --runs src/demist/priors/tiny/psr_ae \\
        --pilot group:1000:{} --pilot channel:1000:'{"norm":"channel"}' --out /tmp/ae_windows
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from demist.config import load_config
from demist.data.manifest import load_manifest, select_subjects
from demist.data.patches import load_sessions, session_tensors
from demist.evaluation.metrics import image_metrics
from demist.models.autoencoder import downsampling_factor, pad_to_multiple
from demist.training.stage1 import load_autoencoder_run, train_autoencoder
from finished_demo import add_demo_arguments, finished_demo


def windows(function: Callable, volume: torch.Tensor, window: list[int], overlap: float) -> torch.Tensor:
    return sliding_window_inference(volume, tuple(window), 4, function, overlap=overlap, mode="gaussian",
                                    padding_mode="constant", cval=0.0, progress=False)


def paths(ae: torch.nn.Module, window: list[int], factor: int) -> dict[str, Callable]:
    encode = lambda x: ae.encode(x)[0]  # noqa: E731
    latent = [w // factor for w in window]
    double, double_latent = [2 * w for w in window], [2 * w for w in latent]
    return {
        "windowed latent (overlap 0.5)": lambda x: windows(ae.decode, windows(encode, x, window, .5), latent, .5),
        "per window, images blended": lambda x: windows(lambda v: ae.decode(encode(v)), x, window, .5),
        "windowed latent (overlap 0.75)": lambda x: windows(ae.decode, windows(encode, x, window, .75), latent, .75),
        "windowed latent, decoded in 2× windows": lambda x: windows(ae.decode, windows(encode, x, window, .5),
                                                                   double_latent, .5),
        "2× windows": lambda x: windows(ae.decode, windows(encode, x, double, .5), double_latent, .5),
        "windowed latent, decoded whole": lambda x: ae.decode(windows(encode, x, window, .5)),
        "whole volume": lambda x: ae.decode(encode(x)),
    }


@torch.no_grad()
def score(run_dir: Path, sessions) -> None:
    run, ae = load_autoencoder_run(run_dir, "psr", "--runs")
    window, factor = list(run.config.autoencoder.patch_size), downsampling_factor(run.config.autoencoder)
    rows: dict[str, list[tuple[float, ...]]] = {}
    for session in sessions:
        volume, crop = pad_to_multiple(session_tensors(session)["target"], factor)
        for name, path in paths(ae, window, factor).items():
            start = time.perf_counter()
            psr = path(volume)[crop][0, 0].numpy()
            metrics = image_metrics(psr, session.psr, session.brain)
            rows.setdefault(name, []).append((metrics["psnr"], metrics["ssim"],
                                              float((psr - session.psr)[session.brain > 0].mean()),
                                              time.perf_counter() - start))
    a = run.config.autoencoder
    print(f"\n{run_dir}: norm {a.norm}, {factor}× compression, {a.latent_channels} latent channels, "
          f"{run.training.get('steps', '?')} steps; {len(sessions)} held-out sessions\n")
    print("| path | PSNR | SSIM | mean error | s / session |\n|---|---:|---:|---:|---:|")
    for name, values in rows.items():
        psnr, ssim, bias, seconds = np.mean(values, axis=0)
        print(f"| {name} | {psnr:.2f} | {ssim:.3f} | {bias:+.4f} | {seconds:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="PSR autoencoder run directories.")
    parser.add_argument("--pilot", action="append", default=[], help="NAME:STEPS:JSON (see above); repeatable.")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--out", type=Path, default=Path("/tmp/demist_autoencoder_windows"))
    args = parser.parse_args()
    torch.manual_seed(0)
    demo = finished_demo(args)
    train_subjects, test_keys = demo.split()
    records = load_manifest(demo.manifest)
    cfg = load_config(args.config)
    runs = list(args.runs)
    print(f"{os.cpu_count()} CPUs; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    for pilot in args.pilot:
        name, steps, overrides = pilot.split(":", 2)
        keys = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(overrides).items()}
        pilot_cfg = cfg.replace(autoencoder=dataclasses.replace(cfg.autoencoder, **keys))
        out = args.out / name
        wall, cpu = time.perf_counter(), time.process_time()
        train_autoencoder(select_subjects(records, train_subjects), pilot_cfg, out, "psr",
                          max_steps=int(steps), device="cpu", resume=(out / "checkpoints").exists())
        print(f"pilot {name}: {int(steps)} steps in {(time.perf_counter() - wall) / 60:.1f} min wall, "
              f"{(time.process_time() - cpu) / 60:.1f} CPU-min, load average {os.getloadavg()[0]:.2f}", flush=True)
        runs.append(out)
    sessions = load_sessions([r for r in records if r.key in set(test_keys)], cfg.data)
    for run_dir in runs:
        score(run_dir, sessions)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
