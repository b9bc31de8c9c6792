"""Merging slot models, as pure functions on state dicts.

- `weighted_average`: the mean of several models weighted by the examples each
  trained on since the last merge (``--merge every=K``); equal weights give the
  plain average of ``--merge final``.
- `with_progress`: a slot that trained on after the models were taken keeps what
  it learnt since: merged + (current - taken).
- `greedy_soup` (Wortsman et al., 2022): candidates in order of accuracy; each is
  kept in the soup only if the soup's accuracy does not drop with it.

Only floating tensors are averaged in a wide accumulator; integer buffers (a
BatchNorm's step count) take the weighted mean rounded, as the strategies do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from coordinator.strategies.functional import accumulator_dtype, cast_back, fold_into

State = Mapping[str, Tensor]


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> dict[str, Tensor]:
    """sum_i w_i * state_i / sum_i w_i, per tensor; uniform if the weights sum to zero."""
    if not states or len(states) != len(weights):
        raise ValueError(f"{len(states)} models and {len(weights)} weights")
    if any(w < 0 for w in weights):
        raise ValueError(f"negative merge weight in {list(weights)}")
    total = float(sum(weights))
    use = list(weights) if total > 0 else [1.0] * len(states)
    total = float(sum(use))
    merged = {}
    for name, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=accumulator_dtype(first.dtype))
        for state, weight in zip(states, use, strict=True):
            fold_into(acc, state[name], weight / total)
        merged[name] = cast_back(acc, first.dtype)
    return merged


def with_progress(merged: State, current: State, taken: State) -> dict[str, Tensor]:
    """merged + (current - taken) for floating tensors; other tensors take `current`."""
    result = {}
    for name, value in merged.items():
        if value.dtype.is_floating_point:
            result[name] = value + (current[name] - taken[name]).to(value.dtype)
        else:
            result[name] = current[name].clone()
    return result


@dataclass(frozen=True)
class Soup:
    """The greedy soup: which candidates it holds, its model and its accuracy."""

    members: tuple[int, ...]
    state: dict[str, Tensor]
    accuracy: float
    tried: tuple[tuple[int, float], ...]  # (candidate, soup accuracy with it) in the order tried


def greedy_soup(candidates: Mapping[int, tuple[State, float]],
                evaluate: Callable[[dict[str, Tensor]], float]) -> Soup:
    """Add candidates best first; keep each whose addition does not lower the accuracy.

    `candidates` maps an id to (model, its own accuracy); `evaluate` scores a model
    (blocking). The soup is the uniform average of its members.
    """
    order = sorted(candidates, key=lambda k: (-candidates[k][1], k))
    members = [order[0]]
    state = {k: v.clone() for k, v in candidates[order[0]][0].items()}
    accuracy = candidates[order[0]][1]
    tried = []
    for key in order[1:]:
        trial = weighted_average([candidates[m][0] for m in [*members, key]],
                                 [1.0] * (len(members) + 1))
        score = evaluate(trial)
        tried.append((key, score))
        if score >= accuracy:
            members, state, accuracy = [*members, key], trial, score
    return Soup(tuple(members), state, accuracy, tuple(tried))
