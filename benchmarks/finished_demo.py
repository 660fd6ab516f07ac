"""What the benchmarks that build on a finished demo share: the options that name the demo, and choosing from a list."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable

from demist.workflows.demo import DemoPlan


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """--demo and the cohort settings it was run with (they fix its split)."""
    parser.add_argument("--demo", type=Path, required=True, help="A finished demo (its DEMIST run names the backbone).")
    parser.add_argument("--subjects", type=int, default=14, help="As given to the demo.")
    parser.add_argument("--held-out", type=int, default=3, help="As given to the demo.")
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
