"""What the benchmarks that build on a finished demo share: the options that name the demo, choosing from a list, and
scoring predictions of its held-out sessions into a printed table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from skimage.metrics import peak_signal_noise_ratio

from demist.evaluation.evaluate import evaluate_predictions
from demist.evaluation.metrics import centred_psnr
from demist.workflows.demo import DemoPlan


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """--demo and the cohort settings it was run with (they fix its split)."""
    parser.add_argument("--demo", type=Path, required=True, help="A finished demo (its DEMIST run names the backbone).")
    parser.add_argument("--subjects", type=int, default=14, help="As given to the demo.")
    parser.add_argument("--held-out", type=int, default=3,
                        help="As given to the demo (a demo that recorded its split.json is split as recorded).")
    parser.add_argument("--seed", type=int, default=0, help="As given to the demo.")


def finished_demo(args: argparse.Namespace) -> DemoPlan:
    return DemoPlan(out=args.demo, subjects=args.subjects, held_out=args.held_out, seed=args.seed, max_steps=None)


def chosen(parser: argparse.ArgumentParser, option: str, text: str, known: Iterable[str]) -> list[str]:
    """The comma-separated names of `text`, each one of `known` (else a parser error naming the option)."""
    known = list(known)
    names = [n for n in text.split(",") if n]
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"{option}: unknown {', '.join(unknown)}; expected some of {', '.join(known)}")
    return names


def print_scores(plan: DemoPlan, rows: Mapping[str, Path], out: Path, psr_range: float, keys: list[str],
                 extra: Mapping[str, float], extra_label: str, first_column: str = "row") -> None:
    """Scores each row's predictions of `keys` with `demist evaluate` (into `out`) and prints PSNR, SSIM, per-lesion
    AUC and one figure of the caller's (`extra`, e.g. seconds per session) as a Markdown table."""
    result = evaluate_predictions(plan.manifest, dict(rows), out, psr_range=psr_range, sessions=keys, bootstrap=100,
                                  progress=False)
    print(f"| {first_column} | PSNR | SSIM | per-lesion AUC | {extra_label} |\n|---|---:|---:|---:|---:|")
    for name in rows:
        metrics, auc = result["metrics"][name], lesion_auc(result, name)
        print(f"| {name} | {metrics['psnr']['mean']:.2f} | {metrics['ssim']['mean']:.4f} | {auc:.3f} | "
              f"{extra[name]:.1f} |")


def lesion_auc(result: Mapping, row: str) -> float:
    """A row's per-lesion AUC from `evaluate_predictions`' result; NaN when the sessions hold no lesions to score."""
    per_row = (result.get("lesion_contrast") or {}).get("auc", {})
    return float(per_row.get(row, {}).get("combined", {}).get("auc", float("nan")))


def psnr_pair(prediction: np.ndarray, truth: np.ndarray, brain: np.ndarray) -> tuple[float, float]:
    """PSNR (data range 1: PSR / psr_range) inside the brain, raw and centred (`demist evaluate`'s psnr and
    psnr_centred, without its SSIM)."""
    p, t = prediction[brain].astype(np.float64), truth[brain].astype(np.float64)
    return float(peak_signal_noise_ratio(t, p, data_range=1.0)), centred_psnr(p, t)
