"""Aggregation strategies: the `Strategy` interface, the built-ins, and `make_strategy`.

A strategy is chosen by a built-in name (`STRATEGIES`) or a ``"module:Class"`` import
path to a `Strategy` subclass; options are passed to its constructor. Make one per
slot: a server optimiser's state belongs to one global model.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from coordinator.strategies.base import Aggregate, Strategy, StrategyError
from coordinator.strategies.fedavg import FedAvg
from coordinator.strategies.fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi
from coordinator.strategies.robust import Krum, Median, RobustStrategy, TrimmedMean

BUILTINS: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedAdam, FedYogi, FedAdagrad, Median, TrimmedMean, Krum)
}
STRATEGIES = tuple(BUILTINS)

__all__ = [
    "BUILTINS",
    "STRATEGIES",
    "Aggregate",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedOpt",
    "FedYogi",
    "Krum",
    "Median",
    "RobustStrategy",
    "Strategy",
    "StrategyError",
    "TrimmedMean",
    "make_strategy",
    "resolve_strategy",
]


def resolve_strategy(name_or_path: str) -> type[Strategy]:
    """The class named by a built-in name or a ``"module:Class"`` path."""
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
