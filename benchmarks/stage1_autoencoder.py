"""Stage-1 benchmark: how well the `tiny` autoencoders reconstruct held-out sessions, and how the alignment helps.

Generates a 2 mm synthetic cohort (or uses --cohort), trains Stage 1 on the training subjects within the preset's
step counts, and reports on the held-out subjects' whole volumes, inside the brain (data range 1):

- PSR autoencoder: PSNR / SSIM of decode(μ(PSR / psr_range)) — the ceiling of everything downstream;
- condition autoencoder: PSNR of T1w and FLAIR;
- alignment error mean ‖μ_c − μ_y‖² (and relative to var μ_y) before and after alignment, and the PSNR of
  D_PSR(μ_c): what the aligned condition latent alone decodes to.

    python benchmarks/stage1_autoencoder.py --subjects 16 --test-subjects 4 --out /tmp/stage1_bench
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from demist.config import load_config
from demist.data.manifest import load_manifest, select_subjects, subjects_of
from demist.data.patches import load_sessions, session_tensors
from demist.evaluation.metrics import image_metrics
from demist.models.autoencoder import autoencoder_from_state, decode_volume, encode_volume, reconstruct
from demist.runs import read_run
from demist.training.stage1 import train_stage1

TARGET_PSNR = 29.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/demist_stage1_benchmark"))
    parser.add_argument("--cohort", type=Path, help="an existing manifest (default: generate one under --out)")
    parser.add_argument("--subjects", type=int, default=16)
    parser.add_argument("--test-subjects", type=int, default=4, help="the last N subjects are held out")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--max-steps", type=int, help="override every Stage-1 step count (quick checks)")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


@torch.no_grad()
def evaluate(stage1_dir: Path, cond_ae_dir: Path, sessions) -> dict[str, float]:
    """Whole-volume figures on held-out sessions, averaged over sessions."""
    run = read_run(stage1_dir, "stage1")
    psr_ae = autoencoder_from_state(run.config.autoencoder, run.weights("psr_autoencoder")).eval()
    cond_ae = autoencoder_from_state(run.config.autoencoder, run.weights("cond_autoencoder")).eval()
    before = read_run(cond_ae_dir, "autoencoder-cond")
    cond_before = autoencoder_from_state(before.config.autoencoder, before.weights("autoencoder")).eval()
    window = run.config.autoencoder.patch_size  # whole volumes go through the autoencoders window by window
    rows = []
    for session in sessions:
        x = session_tensors(session)
        brain = session.brain
        psr = reconstruct(psr_ae, x["target"], window)[0, 0].numpy()
        cond = reconstruct(cond_ae, x["cond"], window)[0].numpy()
        mu_y = encode_volume(psr_ae, x["target"], window)
        mu_c, mu_c0 = encode_volume(cond_ae, x["cond"], window), encode_volume(cond_before, x["cond"], window)
        from_cond = decode_volume(psr_ae, mu_c, window)[0, 0].numpy()
        psr_metrics = image_metrics(psr, session.psr, brain)
        rows.append({
            "psr_psnr": psr_metrics["psnr"], "psr_ssim": psr_metrics["ssim"],
            "t1w_psnr": image_metrics(cond[0], session.t1w, brain)["psnr"],
            "flair_psnr": image_metrics(cond[1], session.flair, brain)["psnr"],
            "align_mse_before": float(((mu_c0 - mu_y) ** 2).mean()),
            "align_mse_after": float(((mu_c - mu_y) ** 2).mean()),
            "align_relative_before": float(((mu_c0 - mu_y) ** 2).mean() / mu_y.var()),
            "align_relative_after": float(((mu_c - mu_y) ** 2).mean() / mu_y.var()),
            "psr_from_cond_latent_psnr": image_metrics(from_cond, session.psr, brain)["psnr"],
        })
    summary = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    summary["psr_psnr_min"] = float(np.min([r["psr_psnr"] for r in rows]))
    return summary


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    manifest = args.cohort
    if manifest is None:
        from demist.data.phantom import generate_cohort

        manifest = generate_cohort(args.out / "cohort", args.subjects, spacing=2.0, seed=0, progress=True)
    records = load_manifest(manifest)
    subjects = subjects_of(records)
    test_subjects = subjects[-args.test_subjects:]
    train_records = select_subjects(records, subjects[: -args.test_subjects])
    cfg = load_config(args.config)

    wall, cpu = time.perf_counter(), time.process_time()
    train_sessions = load_sessions(train_records, cfg.data)
    train_stage1(train_sessions, cfg, args.out / "stage1", max_steps=args.max_steps, device=args.device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    test_sessions = load_sessions(select_subjects(records, test_subjects), cfg.data)
    stage1_run = read_run(args.out / "stage1" / "stage1", "stage1")
    figures = evaluate(args.out / "stage1" / "stage1", args.out / "stage1" / "cond_ae", test_sessions)
    figures.update(train_wall_minutes=wall / 60, train_cpu_minutes=cpu / 60, train_sessions=len(train_sessions),
                   test_sessions=len(test_sessions), latent_scale_factor=stage1_run.latent_scale_factor,
                   train_align_mse_before=stage1_run.metrics["align_mse_before"],
                   train_align_mse_after=stage1_run.metrics["align_mse_after"])
    (args.out / "stage1_benchmark.json").write_text(json.dumps(figures, indent=2))

    print(f"\nStage 1 ({args.config}), {len(train_sessions)} training / {len(test_sessions)} held-out sessions, "
          f"{wall / 60:.1f} min wall, {cpu / 60:.1f} CPU-min")
    print(f"  PSR autoencoder, held-out, inside the brain: PSNR {figures['psr_psnr']:.2f} dB "
          f"(worst session {figures['psr_psnr_min']:.2f}), SSIM {figures['psr_ssim']:.3f}  [target >= {TARGET_PSNR}]")
    print(f"  condition autoencoder: T1w PSNR {figures['t1w_psnr']:.2f} dB, FLAIR PSNR {figures['flair_psnr']:.2f} dB")
    print(f"  alignment error ‖μ_c − μ_y‖², held-out: {figures['align_mse_before']:.4g} before -> "
          f"{figures['align_mse_after']:.4g} after (relative to var μ_y: {figures['align_relative_before']:.3f} -> "
          f"{figures['align_relative_after']:.3f}); training patches: {figures['train_align_mse_before']:.4g} -> "
          f"{figures['train_align_mse_after']:.4g}")
    print("  D_PSR(μ_c) against PSR (the aligned condition latent alone): "
          f"{figures['psr_from_cond_latent_psnr']:.2f} dB")
    print(f"  latent scale factor {figures['latent_scale_factor']:.4g}")
    print("  PASS" if figures["psr_psnr"] >= TARGET_PSNR and figures["align_mse_after"] < figures["align_mse_before"]
          else "  FAIL")


if __name__ == "__main__":
    main()
