"""Configuration: the sections of `demist.config_sections` assembled into one frozen `Config`, loaded from TOML presets.

`load_config("tiny")` or `load_config("paper")` reads a preset shipped with the package. `load_config("my.toml")`
reads a user file that names its base preset (`base = "tiny"`) and overrides any keys of it. Unknown keys and
values of the wrong type are errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from demist.config_sections import (AlignConfig, AutoencoderConfig, BackboneConfig, BaselineConfig, DataConfig,
                                     DemistConfig, DiffusionConfig, DistillConfig, EvaluationConfig, SamplingConfig,
                                     Stage1Config, TrainConfig, UNetConfig)
from demist.errors import DemistError

PRESETS = ("tiny", "paper")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    """Everything a run needs; stored whole in every run directory."""

    preset: str
    data: DataConfig
    autoencoder: AutoencoderConfig
    train: TrainConfig
    stage1: Stage1Config
    align: AlignConfig
    unet: UNetConfig
    diffusion: DiffusionConfig
    backbone: BackboneConfig
    demist: DemistConfig
    sampling: SamplingConfig
    distill: DistillConfig
    evaluation: EvaluationConfig
    baselines: BaselineConfig

    def replace(self, **sections: Any) -> "Config":
        """A copy with some sections replaced: `cfg.replace(demist=dataclasses.replace(cfg.demist, lora=False))`."""
        return dataclasses.replace(self, **sections)

    def first_difference(self, other: "Config", sections: Sequence[str],
                         ignore: Mapping[str, Sequence[str]] | None = None) -> str | None:
        """The first of `sections` in which two runs' configs disagree (None: they agree), ignoring the keys that each
        training stage chooses for itself (`STAGE_OWN_KEYS`) and those named in `ignore` ({section: keys})."""
        for section in sections:
            skip = {*STAGE_OWN_KEYS.get(section, ()), *(ignore or {}).get(section, ())}
            ours, theirs = ({k: v for k, v in dataclasses.asdict(getattr(cfg, section)).items() if k not in skip}
                            for cfg in (self, other))
            if ours != theirs:
                return section
        return None

    def require_same(self, parent: "Config", sections: Sequence[str], source: str) -> None:
        """Refuse a config (--config) whose `sections` differ from those a parent run (`source`) was trained with."""
        section = self.first_difference(parent, sections)
        if section is not None:
            raise DemistError(f"--config: section [{section}] differs from that of {source}; expected the same "
                              f"[{section}] ({getattr(parent, section)})")


#: Keys a stage may set for itself while it builds on runs with other values: the Stage-2 patch size of [data].
STAGE_OWN_KEYS: dict[str, tuple[str, ...]] = {"data": ("patch_size",)}

#: The keys of how T1w and FLAIR are scaled (by section, as `STAGE_OWN_KEYS`): only the condition encoder sees them,
#: and the alignment retrains it on the cohort's scaling, so a prior or condition autoencoder trained with other values
#: is still a starting point.
INPUT_SCALING_KEYS: dict[str, tuple[str, ...]] = {"data": ("percentile_low", "percentile_high", "percentile_margin_mm")}


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation and convert TOML lists to tuples."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise DemistError(f"config key {key}: got {value!r}; expected a table of {annotation.__name__} keys")
        return _build(annotation, value, key)
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise DemistError(f"config key {key}: got {value!r}; expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise DemistError(f"config key {key}: got {len(value)} values; expected {len(args)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DemistError(f"config key {key}: got {value!r}; expected a number")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DemistError(f"config key {key}: got {value!r}; expected an integer")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise DemistError(f"config key {key}: got {value!r}; expected true or false")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise DemistError(f"config key {key}: got {value!r}; expected a string")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")  # a bug in this module


def _build(cls: type, table: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in table:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise DemistError(f"config key {where}: unknown; expected one of {', '.join(names)}")
    values = {}
    for name in names:
        where = f"{prefix}.{name}" if prefix else name
        if name not in table:
            raise DemistError(f"config key {where}: missing")
        values[name] = _convert(table[name], hints[name], where)
    return cls(**values)


def _merge(base: Mapping[str, Any], override: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    merged = dict(base)
    for k, v in override.items():
        where = f"{prefix}.{k}" if prefix else k
        if k not in base:
            raise DemistError(f"config key {where}: unknown; expected one of {', '.join(base)}")
        merged[k] = _merge(base[k], v, where) if isinstance(v, Mapping) and isinstance(base[k], Mapping) else v
    return merged


def _preset_table(name: str) -> dict[str, Any]:
    text = resources.files("demist").joinpath("presets", f"{name}.toml").read_text()
    return tomllib.loads(text)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise DemistError(f"config {path}: not readable ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise DemistError(f"config {path}: not valid TOML ({exc})") from None


def load_config(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load a preset by name (`tiny`, `paper`) or a TOML file that sets `base = "<preset>"` and overrides keys."""
    text = str(name_or_path)
    if text in PRESETS:
        table = _preset_table(text)
    else:
        path = Path(text)
        if not path.is_file():
            raise DemistError(f"config {text}: neither a preset ({', '.join(PRESETS)}) nor an existing TOML file")
        user = _read_toml(path)
        base = user.pop("base", None)
        if base not in PRESETS:
            raise DemistError(f"config {path}: key base = {base!r}; expected one of {', '.join(PRESETS)}")
        table = _merge(_preset_table(base), user)
        table["preset"] = f"{base}+{path.name}"
    if overrides:
        table = _merge(table, overrides)
    return _build(Config, table)


def config_to_dict(config: Config) -> dict[str, Any]:
    """A JSON/TOML-friendly dict of the whole config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return {k: ({kk: plain(vv) for kk, vv in v.items()} if isinstance(v, dict) else v)
            for k, v in dataclasses.asdict(config).items()}


def config_from_dict(table: Mapping[str, Any]) -> Config:
    """The inverse of `config_to_dict` (used to read the config stored in a run directory).

    A key missing from a stored config (a run written before the key existed) takes the value in `ADDED_KEYS` (what
    such a run did) or else the value of the run's base preset, and a warning names it; unknown keys stay errors.
    """
    base = str(table.get("preset", "")).split("+")[0]
    if base in PRESETS:
        preset = _preset_table(base)
        # a section no earlier run used is filled silently: a run from before it has nothing to reproduce there
        table = {**{k: preset[k] for k in ADDED_SECTIONS if k not in table}, **table}
        filled: list[str] = []
        table = _fill_missing(table, _merge(preset, _nested(ADDED_KEYS)), filled)
        if filled and tuple(filled) not in _WARNED:
            _WARNED.add(tuple(filled))
            # ADDED_KEYS reproduce exactly what such a run did: worth a note, not a warning; a preset value is a guess
            guessed = [key for key in filled if key not in ADDED_KEYS]
            logger.log(logging.WARNING if guessed else logging.INFO,
                       "stored config: %s missing (written by an older demist); what runs did before these keys "
                       "existed (or else the %s preset's values) is used", ", ".join(filled), base)
    return _build(Config, table)


_WARNED: set[tuple[str, ...]] = set()  # each set of missing keys is reported once per process

#: Keys added after runs had been written, with the value that reproduces what a run without the key did (the
#: paper's behaviour), whatever the presets now say: a tiny DEMIST run from before the output head has none.
ADDED_KEYS: dict[str, Any] = {
    "data.percentile_margin_mm": 0.0,
    "autoencoder.norm": "group",
    "sampling.start_strength": 1.0,
    "sampling.anchor_sigma": 0.0,
    "align.image_weight": 0.0,
    "align.bias_field": 0.0,
    "demist.timestep_power": 1.0,
    "demist.input_perturbation": 0.0,
    "demist.ema_decay": 0.0,
    "demist.controlnet_output_head": False,
    "demist.hint_bf16": False,
}


#: Sections added after runs had been written, that configure only commands those runs never ran.
ADDED_SECTIONS: tuple[str, ...] = ("distill",)


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        section, key = dotted.split(".")
        out.setdefault(section, {})[key] = value
    return out


def _fill_missing(table: Mapping[str, Any], defaults: Mapping[str, Any], filled: list[str],
                  prefix: str = "") -> dict[str, Any]:
    out = dict(table)
    for k, v in defaults.items():
        where = f"{prefix}.{k}" if prefix else k
        if k not in out:
            out[k] = v
            filled.append(where)
        elif isinstance(v, Mapping) and isinstance(out[k], Mapping):
            out[k] = _fill_missing(out[k], v, filled, where)
    return out

