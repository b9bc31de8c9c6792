"""Per-slot configuration: `--slot-config FILE` (TOML) and `--sweep KEY=V1,V2,...`.

A slot's configuration is a flat map of overrides over the command line's values:
the local-training keys of `TrainingSettings`, ``strategy``, ``strategy.OPTION``
(a strategy option; a table ``strategy_options = {eta = 0.1}`` is the same),
``clients_per_round`` and ``seed`` (the slot's initial-model seed). A key a slot
leaves out takes the command line's value; ``strategy.*`` options of the command
line apply only to a slot that keeps the command line's strategy.

The file holds one ``[[slot]]`` table per slot and, for PBT, an optional
``[bounds]`` table (``lr = [0.001, 0.3]``). Everything is checked before the run
starts: an unknown key, a bad value or more than `MAX_SLOTS` slots is a
`ConfigError` naming the slot and the key.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.settings import CoordinatorSettings, TrainingSettings
from coordinator.strategies import StrategyError, make_strategy

MAX_SLOTS = 16  # a sweep grid or slot-config file larger than this is refused
STRATEGY_PREFIX = "strategy."
# key -> (kind, lowest allowed, lowest excluded?): kinds are "int", "float", "str"
_NUMERIC: dict[str, tuple[str, float, bool]] = {
    "lr": ("float", 0.0, True),
    "momentum": ("float", 0.0, False),
    "weight_decay": ("float", 0.0, False),
    "proximal_mu": ("float", 0.0, False),
    "batch_size": ("int", 1, False),
    "epochs": ("int", 1, False),
    "max_steps": ("int", 0, False),
    "local_steps": ("int", 0, False),
    "clients_per_round": ("int", 0, False),
    "seed": ("int", float("-inf"), False),
}
TRAINING_KEYS = ("lr", "momentum", "weight_decay", "proximal_mu", "batch_size", "epochs",
                 "max_steps", "local_steps")
SLOT_KEYS = (*_NUMERIC, "strategy")
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {"lr": (1e-4, 1.0)}


class ConfigError(ValueError):
    """A slot's configuration cannot be used (the message names the slot and the key)."""


@dataclass(frozen=True)
class Base:
    """The command line's values that slot overrides apply to."""

    training: TrainingSettings
    strategy: str
    strategy_options: Mapping[str, Any]
    clients_per_round: int
    seed: int


@dataclass(frozen=True)
class SlotConfig:
    """One slot's resolved configuration."""

    slot_id: int
    training: TrainingSettings
    strategy: str
    strategy_options: dict[str, Any]
    clients_per_round: int
    seed: int

    def flat(self) -> dict[str, Any]:
        """Every hyperparameter under its override key (what labels and PBT compare)."""
        training = {k: getattr(self.training, k) for k in TRAINING_KEYS}
        options = {STRATEGY_PREFIX + k: v for k, v in sorted(self.strategy_options.items())}
        return {**training, "strategy": self.strategy, **options,
                "clients_per_round": self.clients_per_round, "seed": self.seed}


def resolve(base: Base, slot_id: int, overrides: Mapping[str, Any]) -> SlotConfig:
    """The slot's configuration: `overrides` (already validated) over `base`."""
    chosen = {k: overrides[k] for k in TRAINING_KEYS if k in overrides}
    if ("epochs" in chosen or "max_steps" in chosen) and "local_steps" not in chosen:
        chosen["local_steps"] = 0  # asking for epochs (or a cap) means epochs, as on the CLI
    training = dataclasses.replace(base.training, **chosen)
    strategy = str(overrides.get("strategy", base.strategy))
    options = dict(base.strategy_options) if strategy == base.strategy else {}
    options.update({k[len(STRATEGY_PREFIX):]: v for k, v in overrides.items()
                    if k.startswith(STRATEGY_PREFIX)})
    return SlotConfig(slot_id=slot_id, training=training, strategy=strategy,
                      strategy_options=options,
                      clients_per_round=int(overrides.get("clients_per_round")
                                            or base.clients_per_round),
                      seed=int(overrides.get("seed", base.seed + slot_id)))


def from_flat(like: SlotConfig, slot_id: int, flat: Mapping[str, Any]) -> SlotConfig:
    """A configuration from `SlotConfig.flat` values (PBT's explored ones, a resumed run's)."""
    training = dataclasses.replace(like.training,
                                   **{k: flat[k] for k in TRAINING_KEYS if k in flat})
    options = {k[len(STRATEGY_PREFIX):]: v for k, v in flat.items()
               if k.startswith(STRATEGY_PREFIX)}
    return SlotConfig(slot_id=slot_id, training=training,
                      strategy=str(flat.get("strategy", like.strategy)), strategy_options=options,
                      clients_per_round=int(flat.get("clients_per_round",
                                                     like.clients_per_round)),
                      seed=int(flat.get("seed", like.seed)))


# -- reading and checking ------------------------------------------------------------------


def normalise(slot: int, table: Mapping[str, Any]) -> dict[str, Any]:
    """A slot table as flat override keys (``strategy_options`` unfolded), keys checked."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if key == "strategy_options":
            if not isinstance(value, Mapping):
                raise ConfigError(f"slot {slot}: strategy_options must be a table, got {value!r}")
            flat.update({STRATEGY_PREFIX + k: v for k, v in value.items()})
        elif key in SLOT_KEYS or (key.startswith(STRATEGY_PREFIX) and len(key) > 9):
            flat[key] = value
        else:
            raise ConfigError(f"slot {slot}: unknown key {key!r} (known: "
                              f"{', '.join(SLOT_KEYS)}, strategy_options, strategy.OPTION)")
    return flat


def check(slot: int, overrides: Mapping[str, Any], base: Base) -> None:
    """Raise `ConfigError` for a bad value; builds the slot's strategy once to check it."""
    for key, value in overrides.items():
        if key in _NUMERIC:
            _check_number(slot, key, value)
        elif key == "strategy" and not isinstance(value, str):
            raise ConfigError(f"slot {slot}: strategy must be a name, got {value!r}")
    config = resolve(base, slot, overrides)
    try:
        make_strategy(config.strategy, **config.strategy_options)
    except StrategyError as exc:
        key = "strategy" if "strategy" in overrides else "strategy options"
        raise ConfigError(f"slot {slot}: {key}: {exc}") from exc


def _check_number(slot: int, key: str, value: Any) -> None:
    kind, low, exclusive = _NUMERIC[key]
    ok_type = isinstance(value, int) if kind == "int" else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type:
        noun = "an integer" if kind == "int" else "a number"
        raise ConfigError(f"slot {slot}: {key} must be {noun}, got {value!r}")
    if value < low or (exclusive and value == low) or (key == "momentum" and value >= 1):
        bound = "[0, 1)" if key == "momentum" else f"{'>' if exclusive else '>='} {low:g}"
        raise ConfigError(f"slot {slot}: {key} must be {bound}, got {value!r}")


def parse_sweep(items: Sequence[str]) -> list[dict[str, Any]]:
    """The grid of ``KEY=V1,V2`` items, one override map per point (first key slowest)."""
    axes: list[tuple[str, list[Any]]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or not raw:
            raise ConfigError(f"--sweep {item!r}: expected KEY=V1,V2,...")
        if key in (k for k, _ in axes):
            raise ConfigError(f"--sweep: key {key!r} given twice")
        axes.append((key, [_value(v) for v in raw.split(",")]))
    size = 1
    for _key, values in axes:
        size *= len(values)
    if size > MAX_SLOTS:
        grid = " x ".join(f"{k} ({len(v)})" for k, v in axes)
        raise ConfigError(f"--sweep: {grid} makes {size} slots, more than the maximum "
                          f"{MAX_SLOTS}")
    keys = [k for k, _ in axes]
    return [dict(zip(keys, point, strict=True))
            for point in itertools.product(*(v for _, v in axes))]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def read_file(path: Path) -> tuple[list[dict[str, Any]], dict[str, tuple[float, float]]]:
    """The ``[[slot]]`` tables (unfolded, keys checked) and ``[bounds]`` of a TOML file."""
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--slot-config {path}: {exc}") from exc
    unknown = sorted(set(document) - {"slot", "bounds"})
    if unknown:
        raise ConfigError(f"--slot-config {path}: unknown table(s) {unknown} "
                          "(known: [[slot]], [bounds])")
    return (read_tables(document.get("slot", []), f"--slot-config {path}"),
            parse_bounds(document.get("bounds", {})))


def read_tables(tables: Any, where: str) -> list[dict[str, Any]]:
    """``[[slot]]`` tables (from a slot-config or a run file) unfolded, keys checked."""
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{where}: no [[slot]] tables")
    if len(tables) > MAX_SLOTS:
        raise ConfigError(f"{where}: {len(tables)} slots, more than the maximum {MAX_SLOTS}")
    return [normalise(i, t) for i, t in enumerate(tables)]


def parse_bounds(table: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """PBT's explore bounds: ``KEY = [low, high]`` for numeric keys and strategy options."""
    bounds: dict[str, tuple[float, float]] = {}
    for key, pair in table.items():
        perturbable = (key in _NUMERIC and key not in ("seed", "clients_per_round")) or (
            key.startswith(STRATEGY_PREFIX))
        if not perturbable:
            raise ConfigError(f"bounds: {key!r} cannot be explored (numeric training keys "
                              "and strategy.OPTION can)")
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(x, int | float) and not isinstance(x, bool) for x in pair)
                and pair[0] < pair[1]):
            raise ConfigError(f"bounds: {key} must be [low, high] with low < high, got {pair!r}")
        bounds[key] = (float(pair[0]), float(pair[1]))
    return bounds


def slot_overrides(config_file: Path | None, sweep: Sequence[str], base: Base,
                   tables: Sequence[Mapping[str, Any]] | None = None
                   ) -> tuple[list[dict[str, Any]], dict[str, tuple[float, float]]]:
    """Every slot's checked overrides and the explore bounds, from the slot-config file, the
    sweep or a run file's ``[[slot]]`` tables (`tables`), only one of them."""
    if sum((config_file is not None, bool(sweep), tables is not None)) > 1:
        raise ConfigError("give --slot-config, --sweep or [[slot]] tables, not several")
    bounds: dict[str, tuple[float, float]] = {}
    if config_file is not None:
        overrides, bounds = read_file(config_file)
    elif tables is not None:
        overrides = read_tables(list(tables), "run file")
    else:
        overrides = [normalise(i, point) for i, point in enumerate(parse_sweep(sweep))]
    if overrides == [{}]:
        return [], bounds
    for slot, table in enumerate(overrides):
        check(slot, table, base)
    return overrides, bounds


def base_of(settings: CoordinatorSettings) -> Base:
    """The command line's values, as slot overrides see them."""
    return Base(training=settings.training, strategy=settings.strategy,
                strategy_options=settings.strategy_options,
                clients_per_round=settings.round_size, seed=settings.seed)


def run_configs(settings: CoordinatorSettings, saved: Mapping[str, Any] | None = None
                ) -> dict[int, SlotConfig]:
    """Every slot's configuration: from its overrides, or as a resumed run last saved it
    (`saved`: state.json's ``slot_configs``, what PBT changed)."""
    base = base_of(settings)
    configs = {}
    for slot_id in range(settings.slots):
        overrides = (settings.slot_overrides[slot_id]
                     if slot_id < len(settings.slot_overrides) else {})
        config = resolve(base, slot_id, overrides)
        if saved and str(slot_id) in saved:
            config = from_flat(config, slot_id, saved[str(slot_id)])
        configs[slot_id] = config
    return configs
