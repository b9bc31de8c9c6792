"""Merging slot models, as a pure function on state dicts.

`weighted_average`: the mean of several models weighted by the examples each
folded in the merge window (``--merge every=K``); equal weights give the plain
average and the soups of ``--merge final`` (`coordinator.population.final`).

Only floating tensors are averaged in a wide accumulator; integer buffers (a
BatchNorm's step count) take the weighted mean rounded, as the strategies do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
