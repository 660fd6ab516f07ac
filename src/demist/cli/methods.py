"""`demist train <method>`: one command per method of the registry (`demist.methods.METHODS`), all made the same way.

A command's options follow from its entry: --stage1 and --backbone for the methods that build on them; --max-steps,
--device, --resume and --tensorboard for the methods that train in steps (ridge and constant are fitted in seconds on
the CPU and take none of them); and one --no-<switch> ablation flag per stream of `STREAM_SWITCHES` for DEMIST. The
single-stream ablations in the registry are those flags, not commands of their own.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from demist.cli.options import (BACKBONE, CONFIG, DEVICE, FIT_OUT, MANIFEST, MAX_STEPS, OUT, RESUME, STAGE1,
                                TENSORBOARD)
from demist.config_sections import STREAM_SWITCHES
from demist.methods import METHODS, TrainJob

#: The methods that get a `demist train` command (the ablations are `demist train demist --no-<switch>`).
COMMANDS = tuple(name for name, m in METHODS.items() if m.ablation_of is None)


def _parameters(name: str) -> list[inspect.Parameter]:
    method = METHODS[name]
    options: list[tuple[str, Any, Any]] = [("manifest", Path, MANIFEST)]
    options += [(run, Path, {"stage1": STAGE1, "backbone": BACKBONE}[run]) for run in method.needs]
    options += [("config", str, CONFIG), ("out", Path, OUT if method.iterative else FIT_OUT)]
    if method.iterative:
        options += [("max_steps", Optional[int], MAX_STEPS), ("device", str, DEVICE), ("resume", bool, RESUME),
                    ("tensorboard", bool, TENSORBOARD)]
    if method.stream_flags:
        options += [(f"no_{switch}", bool, typer.Option(False, f"--no-{switch}",
                                                        help=f"Ablation: no {stream} stream ({switch})."))
                    for stream, switch in STREAM_SWITCHES.items()]
    return [inspect.Parameter(option, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
            for option, annotation, default in options]


def train_command(name: str) -> Callable[..., None]:
    """The `demist train <name>` command of a registered method (typer reads the generated signature)."""
    method = METHODS[name]

    def command(**options: Any) -> None:
        from demist.config import load_config

        off = tuple(switch for switch in STREAM_SWITCHES.values() if options.pop(f"no_{switch}", False))
        config = load_config(options.pop("config"))
        result = method.train(TrainJob(config=config, streams_off=off, **options))
        if result is not None:  # None on the non-main processes of a multi-process launch
            typer.echo(method.report(result) if method.report else f"{name}: {options['out']}")

    command.__signature__ = inspect.Signature(_parameters(name))  # type: ignore[attr-defined]
    command.__doc__ = method.summary
    command.__name__ = f"train_{name.replace('-', '_')}"
    return command
