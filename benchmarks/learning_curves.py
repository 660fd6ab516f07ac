"""Held-out quality against training CPU-minutes: DEMIST, FT-LDM and cWDM at several step budgets.

On a finished demo (its cohort, split, Stage 1 and backbone), each method trains from scratch at each of its step
budgets (`BUDGETS`, or `--steps`; the method's own step key: [demist] steps for DEMIST and FT-LDM, [baselines] steps
for cWDM), synthesizes
the demo's held-out sessions through `demist synthesize`'s path, and is scored by `demist evaluate`. The CPU-minutes
are the training process's CPU time (user + system, every thread). Stage 1 and the backbone, which DEMIST and FT-LDM
share and cWDM does not need, are not in their curves: the demo's `timings.json` gives their cost. Writes
`learning_curves.csv` and `learning_curves.png` into --out, with the demo's ridge and aligned-condition rows drawn as
horizontal lines; finished runs are reused when rerun.

    python benchmarks/learning_curves.py --demo demo --out /tmp/curves                       # about 85 min, 2 cores
    python benchmarks/learning_curves.py --demo demo --out /tmp/curves --methods demist --steps 100,200
    python benchmarks/learning_curves.py --demo demo --out /tmp/curves --finished-only   # score what has finished
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import time
from pathlib import Path

from demist.atomic import atomic_write
from demist.config import load_config
from demist.evaluation.evaluate import evaluate_predictions
from demist.inference.batch import synthesize_manifest
from demist.methods import METHODS, TrainJob, load_synthesizer
from finished_demo import add_demo_arguments, chosen, finished_demo, lesion_auc

#: Step budgets per method, chosen to span a similar range of CPU-minutes (a cWDM step, on images, costs about 4
#: DEMIST steps on latents).
BUDGETS = {"demist": (100, 200, 400, 800, 1600), "ftldm": (100, 200, 400, 800, 1600),
           "cwdm": (25, 50, 100, 200, 400, 800)}
REFERENCE_ROWS = ("ridge", "aligned-condition")  # taken from the demo's predictions when there


def _train(method: str, job: TrainJob, budgets: Path) -> float:
    """Train one (method, budget) unless finished; its CPU-minutes, kept in `budgets` for reruns."""
    run = job.out
    recorded = json.loads(budgets.read_text()) if budgets.exists() else {}
    if (run / "run.json").exists():  # finished: never trained again (its CPU-minutes unknown if not recorded)
        return recorded.get(run.name, float("nan"))
    start, cpu = time.perf_counter(), time.process_time()
    METHODS[method].train(job)
    recorded[run.name] = round((time.process_time() - cpu) / 60, 2)
    atomic_write(budgets, json.dumps(recorded, indent=1) + "\n")
    print(f"{run.name}: {(time.perf_counter() - start) / 60:.1f} min wall, {recorded[run.name]:.1f} CPU-min; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    return recorded[run.name]


def _figure(rows: list[dict], references: dict[str, dict[str, float]], out: Path) -> None:
    """Two panels: raw PSNR, and PSNR with each session's mean error removed (the level no method predicts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    # plain numbers at 1-2-5 steps: the log axis's default minor labels (3×10⁰, 4×10⁰, ...) overlap
    low, high = min(r["cpu_minutes"] for r in rows), max(r["cpu_minutes"] for r in rows)
    ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200) if low / 1.5 <= t <= high * 1.5]
    for ax, key, label in zip(axes, ("psnr", "psnr_centred"), ("held-out PSNR (dB, brain)",
                                                                "held-out PSNR, level removed (dB, brain)")):
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["cpu_minutes"])
            ax.plot([r["cpu_minutes"] for r in mine], [r[key] for r in mine], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for name, values in references.items():
            ax.axhline(values[key], linestyle="--", linewidth=1, color="grey")
            ax.text(0.01, values[key], name, transform=ax.get_yaxis_transform(), va="bottom", fontsize=8,
                    color="grey")
        ax.set_xlabel("training CPU-minutes (Stage 1 and backbone not counted)")
        ax.set_ylabel(label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default=",".join(BUDGETS))
    parser.add_argument("--steps", default=None,
                        help="Step budgets for every method, comma-separated (default: each method's BUDGETS).")
    parser.add_argument("--finished-only", action="store_true",
                        help="Train nothing: score the runs that have finished (after an interrupted benchmark).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    methods = chosen(parser, "--methods", args.methods, METHODS)
    try:
        steps = sorted({int(s) for s in args.steps.split(",") if s}) if args.steps else None
    except ValueError:
        parser.error(f"--steps {args.steps}: expected comma-separated integers")
    plan = {m: steps or list(BUDGETS.get(m, BUDGETS["demist"])) for m in methods}

    cfg = load_config("tiny")
    demo = finished_demo(args)
    train_subjects, test_keys = demo.split()
    args.out.mkdir(parents=True, exist_ok=True)
    predictions: dict[str, Path] = {}
    cpu_minutes: dict[str, float] = {}
    # smallest budgets of every method first: an interrupted run already has whole curves to show
    for rank in range(max(len(b) for b in plan.values())):
        for method, steps in ((m, b[rank]) for m, b in plan.items() if rank < len(b)):
            name = f"{method}-{steps}"
            run = args.out / "runs" / name
            if args.finished_only and not (run / "run.json").exists():
                continue
            job = TrainJob(demo.manifest, cfg, run, stage1=demo.stage1, backbone=demo.backbone(),
                           subjects=train_subjects, max_steps=steps, device="cpu", resume=True)
            cpu_minutes[name] = _train(method, job, args.out / "budgets.json")
            synthesize_manifest(load_synthesizer(run, device="cpu"), demo.manifest, args.out / "predictions" / name,
                                sessions=test_keys, progress=False)
            predictions[name] = args.out / "predictions" / name
    references = {r: demo.predictions(r) for r in REFERENCE_ROWS if demo.predictions(r).is_dir()}
    results = evaluate_predictions(demo.manifest, {**predictions, **references}, args.out / "evaluation",
                                   psr_range=cfg.data.psr_range, ring_mm=cfg.evaluation.ring_mm, bootstrap=200,
                                   sessions=test_keys, progress=False)
    rows = []
    for name in predictions:
        method, steps = name.rsplit("-", 1)
        metrics = results["metrics"][name]
        rows.append({"method": method, "steps": int(steps), "cpu_minutes": cpu_minutes[name],
                     **{k: metrics[k]["mean"] for k in ("psnr", "psnr_centred", "ssim", "mse")},
                     "lesion_auc": lesion_auc(results, name)})
    with open(args.out / "learning_curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    reference_rows = {r: {k: results["metrics"][r][k]["mean"] for k in ("psnr", "psnr_centred", "ssim")}
                      for r in references}
    _figure(rows, reference_rows, args.out / "learning_curves.png")
    print(f"\n{len(test_keys)} held-out sessions; inside the brain, PSR/{cfg.data.psr_range}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'method':10s} {'steps':>6s} {'CPU-min':>8s} {'PSNR dB':>8s} {'centred':>8s} {'SSIM':>6s} "
          f"{'lesion AUC':>10s}")
    for r in rows:
        print(f"{r['method']:10s} {r['steps']:6d} {r['cpu_minutes']:8.1f} {r['psnr']:8.2f} {r['psnr_centred']:8.2f} "
              f"{r['ssim']:6.3f} {r['lesion_auc']:10.3f}")
    for name, values in reference_rows.items():
        print(f"{name:17s} {'':8s} {values['psnr']:8.2f} {values['psnr_centred']:8.2f} {values['ssim']:6.3f} "
              f"{lesion_auc(results, name):10.3f}")
    print(f"figure: {args.out / 'learning_curves.png'}")


if __name__ == "__main__":
    main()
