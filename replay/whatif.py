"""What-if grids: `--simulate slots=1,2,3 policy=partition,greedy quorum=1.0,0.5`
(and `client_choice=least-used,policy-order`).

Each setting of the grid is simulated a few times (different seeded draws of
the recorded durations) and the predictions averaged. The recorded setting is
always simulated too, and its prediction against the recorded wall time is the
simulator's own error bar.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass, replace
from statistics import fmean
from typing import Any

from replay import intervals
from replay.errors import UsageError
from replay.model import Run
from replay.profile import Profile, build_profile, default_round_size
from replay.simulate import Setting, SimResult, Simulation

REPEATS = 5
GRID_KEYS = ("slots", "policy", "client_choice", "quorum", "clients_per_round", "rounds")
POLICIES = ("partition", "greedy")
CLIENT_CHOICES = ("least-used", "policy-order")
# A log without `client_choice` predates the option: its pool took clients in policy order.
CHOICE_BEFORE_THE_OPTION = "policy-order"

Grid = dict[str, list[Any]]


@dataclass(frozen=True)
class Prediction:
    """The averaged outcome of one setting."""

    setting: dict[str, Any]
    recorded_setting: bool
    wall_s: float
    wall_s_min: float
    wall_s_max: float
    slot_rounds: float
    slot_rounds_per_hour: float
    coordinator_busy_fraction: float
    client_idle_fraction: float
    mean_round_s: float | None
    failed_rounds: float
    finished: bool


@dataclass(frozen=True)
class WhatIf:
    """All predictions for one recorded run, and how well the recorded setting came out."""

    file: str
    label: str
    repeats: int
    seed: int
    draw: str
    latency_s: float
    trainers: dict[str, int]
    recorded_wall_s: float
    recorded_error: float | None  # (predicted - recorded) / recorded, for the recorded setting
    recorded_note: str
    predictions: list[Prediction]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_grid(items: list[str]) -> Grid:
    """`["slots=1,2", "quorum=1.0,0.5"]` -> {"slots": [1, 2], "quorum": [1.0, 0.5]}."""
    grid: Grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in GRID_KEYS:
            raise UsageError(f"--simulate {item!r}: expected KEY=V1,V2 with KEY one of "
                             f"{', '.join(GRID_KEYS)}")
        grid[key] = [_value(key, v.strip()) for v in values.split(",") if v.strip()]
        if not grid[key]:
            raise UsageError(f"--simulate {item!r}: no values")
    return grid


def _value(key: str, text: str) -> Any:
    try:
        if key == "policy":
            if text not in POLICIES:
                raise ValueError(f"policy must be one of {', '.join(POLICIES)}")
            return text
        if key == "client_choice":
            if text not in CLIENT_CHOICES:
                raise ValueError(f"client_choice must be one of {', '.join(CLIENT_CHOICES)}")
            return text
        if key == "quorum":
            value = float(text)
            if not 0.0 < value <= 1.0:
                raise ValueError("quorum must be in (0, 1]")
            return value
        number = int(text)
        if number < 1:
            raise ValueError(f"{key} must be at least 1")
        return number
    except ValueError as exc:
        raise UsageError(f"--simulate {key}={text}: {exc}") from exc


def recorded_setting(profile: Profile, rounds: int | None = None) -> Setting:
    """The setting the run was recorded with."""
    config = profile.config
    slots = _int(config.get("slots"), 1)
    expected = _int(config.get("expected_clients"), len(profile.clients))
    per_round = _int(config.get("clients_per_round"), 0)
    return Setting(
        slots=slots,
        policy=str(config.get("policy", "partition")),
        quorum=_float(config.get("quorum"), 1.0),
        clients_per_round=per_round or default_round_size(expected, slots),
        rounds=rounds or _int(config.get("rounds"), 1),
        min_clients=_int(config.get("min_clients"), 1),
        deadline_s=_float(config.get("deadline_s"), 600.0),
        client_choice=str(config.get("client_choice", CHOICE_BEFORE_THE_OPTION)),
    )


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _int(value: object, default: int) -> int:
    number = _number(value)
    return default if number is None else int(number)


def _float(value: object, default: float) -> float:
    number = _number(value)
    return default if number is None else number


def grid_settings(base: Setting, grid: Grid, expected_clients: int) -> list[Setting]:
    """Every combination of the grid, other keys as recorded; the round size follows
    the slot count (as the coordinator's default does) unless the grid fixes it."""
    auto_size = base.clients_per_round == default_round_size(expected_clients, base.slots)
    keys = list(grid)
    settings = []
    for values in itertools.product(*(grid[k] for k in keys)):
        setting = replace(base, **dict(zip(keys, values, strict=True)))
        if auto_size and "clients_per_round" not in grid:
            size = default_round_size(expected_clients, setting.slots)
            setting = replace(setting, clients_per_round=size)
        settings.append(replace(setting, min_clients=min(setting.min_clients,
                                                         setting.clients_per_round)))
    return settings


def predict(profile: Profile, setting: Setting, *, seed: int, repeats: int = REPEATS,
            recorded: bool = False, draw: str = "ordered") -> Prediction:
    """Simulate one setting `repeats` times and average. Replay i shuffles the pool with
    the run's seed + i (replay 0 exactly as the coordinator did) and draws with `seed`."""
    pool_seed = _int(profile.config.get("seed"), 0)
    results = [
        Simulation(profile, setting, random.Random(f"{seed}:{i}:{setting}"), pool_seed + i,
                   draw).run()
        for i in range(repeats)
    ]
    walls = [profile.startup_s + r.span_s + profile.tail_s for r in results]
    rounds = fmean(r.slot_rounds for r in results)
    durations = [d for r in results for d in r.round_durations]
    return Prediction(
        setting=asdict(setting),
        recorded_setting=recorded,
        wall_s=fmean(walls),
        wall_s_min=min(walls),
        wall_s_max=max(walls),
        slot_rounds=rounds,
        slot_rounds_per_hour=intervals.fraction(rounds, fmean(walls) / 3600.0),
        coordinator_busy_fraction=fmean(_busy(r) for r in results),
        client_idle_fraction=fmean(1.0 - _client_busy(r) for r in results),
        mean_round_s=fmean(durations) if durations else None,
        failed_rounds=fmean(r.failed_rounds for r in results),
        finished=all(r.finished for r in results),
    )


def _busy(result: SimResult) -> float:
    return intervals.fraction(result.coordinator_busy_s, result.span_s)


def _client_busy(result: SimResult) -> float:
    return intervals.fraction(result.client_busy_s, result.span_s * result.clients)


def predict_grid(run: Run, grid: Grid, *, seed: int = 0, rounds: int | None = None,
                 repeats: int = REPEATS, draw: str = "ordered") -> WhatIf:
    """The recorded setting first, then every setting of the grid (duplicates once)."""
    profile = build_profile(run)
    if not profile.clients or not any(profile.jobs.values()):
        raise UsageError(f"{run.path}: no client jobs recorded; nothing to replay")
    base = recorded_setting(profile, rounds)
    expected = _int(profile.config.get("expected_clients"), len(profile.clients))
    settings = [base] + [s for s in grid_settings(base, grid, expected) if s != base]
    predictions = [predict(profile, s, seed=seed, repeats=repeats, recorded=s == base,
                           draw=draw) for s in settings]
    error, note = _recorded_error(run, predictions[0], rounds)
    return WhatIf(file=str(run.path), label=run.label, repeats=repeats, seed=seed, draw=draw,
                  latency_s=profile.latency_s, trainers=profile.trainers,
                  recorded_wall_s=run.wall_s, recorded_error=error, recorded_note=note,
                  predictions=predictions)


def _recorded_error(run: Run, prediction: Prediction, rounds: int | None) -> tuple[float | None,
                                                                                    str]:
    if len(run.segments) > 1:
        return None, "the run restarted; its wall time includes the downtime"
    if run.status != "finished":
        return None, f"the run did not finish ({run.status})"
    if rounds is not None:
        return None, "--sim-rounds differs from the recorded rounds"
    return intervals.fraction(prediction.wall_s - run.wall_s, run.wall_s), ""
