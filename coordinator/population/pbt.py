"""Population-based training's decisions (Jaderberg et al., 2017), as pure functions.

Every `every` rounds of a slot, with the latest evaluation of each slot: a slot in
the bottom `fraction` of the population *exploits* a slot drawn from the top
`fraction` (it takes that slot's weights, strategy state and hyperparameters),
then *explores*: each hyperparameter with bounds is multiplied by a factor drawn
from `factors` and clipped to its bounds. A slot outside the bottom does nothing.

`exploit_copy` makes the copy (deep, so the donor trains on untouched); `decide`
and `explore` only choose. Randomness comes from an injected `random.Random`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from coordinator.strategies import Strategy, make_strategy

STRATEGY_PREFIX = "strategy."
INTEGER_KEYS = frozenset({"batch_size", "epochs", "max_steps", "local_steps"})


@dataclass(frozen=True)
class PbtSettings:
    every: int = 2  # rounds of a slot between its exploit/explore decisions
    fraction: float = 0.25  # bottom and top fractions of the population (at least one slot)
    factors: tuple[float, ...] = (0.8, 1.25)


@dataclass(frozen=True)
class Member:
    """A slot as PBT sees it: its latest evaluated score and the round it belongs to."""

    slot_id: int
    score: float
    round: int


@dataclass(frozen=True)
class Exploit:
    """`target` takes the weights, strategy state and hyperparameters of `donor`."""

    target: Member
    donor: Member


def is_due(round_: int, settings: PbtSettings) -> bool:
    """Whether a slot that just closed `round_` decides now."""
    return settings.every > 0 and round_ % settings.every == 0


def ranked(members: Mapping[int, Member]) -> list[Member]:
    """Best first; ties by slot id, so the order never depends on dict order."""
    return sorted(members.values(), key=lambda m: (-m.score, m.slot_id))


def decide(slot_id: int, members: Mapping[int, Member], settings: PbtSettings,
           rng: random.Random) -> Exploit | None:
    """An exploit for `slot_id` if it ranks in the bottom fraction, else None."""
    if slot_id not in members or len(members) < 2:
        return None
    order = ranked(members)
    cut = max(1, math.floor(len(order) * settings.fraction))
    bottom, top = order[-cut:], order[:cut]
    if members[slot_id] not in bottom or members[slot_id] in top:
        return None
    donor = rng.choice(top)
    if donor.score <= members[slot_id].score:
        return None  # a tie at the top and the bottom: nothing better to copy
    return Exploit(target=members[slot_id], donor=donor)


def explore(hyperparameters: Mapping[str, object], bounds: Mapping[str, tuple[float, float]],
            settings: PbtSettings, rng: random.Random) -> dict[str, object]:
    """The hyperparameters with every bounded numeric one perturbed within its bounds."""
    result = dict(hyperparameters)
    for key in sorted(bounds):
        value = result.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        low, high = bounds[key]
        moved = min(max(float(value) * rng.choice(settings.factors), low), high)
        result[key] = max(1, round(moved)) if key in INTEGER_KEYS else moved
    return result


def changed(before: Mapping[str, object], after: Mapping[str, object]) -> dict[str, list[object]]:
    """``{key: [old, new]}`` for every value that differs."""
    return {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)}


def exploit_copy(weights: Mapping[str, torch.Tensor], strategy_state: Mapping[str, torch.Tensor],
                 strategy: str, strategy_options: Mapping[str, object]
                 ) -> tuple[dict[str, torch.Tensor], Strategy]:
    """The target's new model and strategy: deep copies of the donor's (blocking: a thread)."""
    state = {k: v.detach().clone() for k, v in weights.items()}
    new_strategy = make_strategy(strategy, **strategy_options)
    new_strategy.load_state_dict({k: v.detach().clone() for k, v in strategy_state.items()})
    return state, new_strategy
