"""Aggregation strategies: the `Strategy` interface, the built-ins, and `make_strategy`.

A strategy is chosen by a built-in name (`STRATEGIES`, `ALIASES`) or a
``"module:Class"`` import path to a `Strategy` subclass; options are passed to its
constructor. Make one per slot: a server optimiser's state belongs to one global
model. docs/strategies.md lists the built-ins, their options and papers;
`coordinator.strategies.examples` is a custom strategy to copy.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from coordinator.strategies.base import Aggregate, Strategy, StrategyError
from coordinator.strategies.fedavg import FedAvg
from coordinator.strategies.fedavgm import FedAvgM
from coordinator.strategies.fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi, ServerOptimiser
from coordinator.strategies.robust import (
    Bulyan,
    GeometricMedian,
    Krum,
    Median,
    RobustStrategy,
    TrimmedMean,
)

BUILTINS: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad,
        Median, TrimmedMean, Krum, Bulyan, GeometricMedian,
    )
}  # fmt: skip
STRATEGIES = tuple(BUILTINS)
# Other names users know a built-in by (RFA is the paper's name for the geometric median).
ALIASES = {"rfa": "geomed"}

__all__ = [
    "ALIASES",
    "BUILTINS",
    "STRATEGIES",
    "Aggregate",
    "Bulyan",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedOpt",
    "FedYogi",
    "GeometricMedian",
    "Krum",
    "Median",
    "RobustStrategy",
    "ServerOptimiser",
    "Strategy",
    "StrategyError",
    "TrimmedMean",
    "make_strategy",
    "resolve_strategy",
]


def resolve_strategy(name_or_path: str) -> type[Strategy]:
    """The class named by a built-in name (or alias) or a ``"module:Class"`` path."""
    name_or_path = ALIASES.get(name_or_path, name_or_path)
    if name_or_path in BUILTINS:
        return BUILTINS[name_or_path]
    module_name, sep, attr = name_or_path.partition(":")
    if not sep or not module_name or not attr:
        raise StrategyError(
            f"unknown strategy {name_or_path!r}: choose one of {', '.join(STRATEGIES)}, "
            "or give an import path 'module:Class'"
        )
    try:
        found: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise StrategyError(f"strategy {name_or_path!r}: cannot import {module_name}") from exc
    for part in attr.split("."):
        found = getattr(found, part, None)
    if not (isinstance(found, type) and issubclass(found, Strategy)):
        raise StrategyError(f"strategy {name_or_path!r} is not a Strategy subclass")
    if inspect.isabstract(found):
        raise StrategyError(f"strategy {name_or_path!r} is abstract")
    return found


def make_strategy(name_or_path: str, **options: Any) -> Strategy:
    """A new strategy instance: a built-in name or ``"module:Class"``, with its options."""
    cls = resolve_strategy(name_or_path)
    try:
        return cls(**options)
    except TypeError as exc:
        detail = f"bad options {sorted(options)}: {exc}"
        raise StrategyError(f"strategy {name_or_path!r}: {detail}") from exc
