"""Aggregation and server-optimiser maths as pure functions on tensors.

Nothing here keeps state: each function takes tensors and returns new ones (only
`fold_into` writes, into the accumulator its caller owns), so every rule is tested
on its own and the strategy classes stay thin.

Conventions: a *stack* is one tensor per client stacked on dim 0; an *accumulator*
dtype is float32 for half/single precision and bool, float64 for float64 and
integer tensors (BatchNorm's ``num_batches_tracked``), so sums stay exact enough.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to sum tensors of `dtype` in: float32, or float64 for float64/integers."""
    if dtype.is_complex:
        raise ValueError(f"complex tensors are not aggregated: {dtype}")
    if dtype.is_floating_point:
        return torch.float64 if dtype == torch.float64 else torch.float32
    if dtype == torch.bool:
        return torch.float32
    return torch.float64


def cast_back(value: Tensor, dtype: torch.dtype) -> Tensor:
    """`value` (an accumulator-dtype result) as `dtype`: integers rounded, bools by majority."""
    if dtype == torch.bool:
        return value > 0.5
    if dtype.is_floating_point:
        return value.to(dtype)
    return value.round().to(dtype)


def fold_into(acc: Tensor, update: Tensor, weight: float) -> None:
    """acc += weight * update, widening `update` to the accumulator's dtype and device."""
    acc.add_(update.to(device=acc.device, dtype=acc.dtype), alpha=weight)


def weighted_mean(stack: Tensor, weights: Tensor) -> Tensor:
    """Mean over dim 0 weighted by `weights` (one per row); uniform if they sum to zero."""
    w = weights.to(device=stack.device, dtype=stack.dtype)
    if float(w.sum()) <= 0.0:
        w = torch.ones_like(w)
    w = w.reshape(-1, *([1] * (stack.dim() - 1)))
    return (stack * w).sum(dim=0) / w.sum()


def coordinate_median(stack: Tensor) -> Tensor:
    """Coordinate-wise median over dim 0; the mean of the two middle values for an even count."""
    n = stack.shape[0]
    ordered = stack.sort(dim=0).values
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trim_count(n: int, beta: float) -> int:
    """How many values `trimmed_mean` drops at each end of `n`."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed mean beta must be in [0, 0.5), got {beta}")
    return int(beta * n + 1e-9)


def trimmed_mean(stack: Tensor, beta: float) -> Tensor:
    """Coordinate-wise mean over dim 0 after dropping the int(beta*n) lowest and highest."""
    return trimmed_mean_by_count(stack, trim_count(stack.shape[0], beta))


def trimmed_mean_by_count(stack: Tensor, cut: int) -> Tensor:
    """Coordinate-wise mean over dim 0 after dropping the `cut` lowest and highest."""
    n = stack.shape[0]
    if cut == 0:
        return stack.mean(dim=0)
    if 2 * cut >= n:
        raise ValueError(f"cannot trim {cut} at each end of {n} values")
    return stack.sort(dim=0).values[cut : n - cut].mean(dim=0)


def squared_distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """Squared Euclidean distance between two state dicts seen as one flat vector."""
    total = 0.0
    for name, tensor in a.items():
        diff = tensor.to(torch.float64) - b[name].to(torch.float64)
        total += float(diff.square().sum())
    return total


def pairwise_squared_distances(states: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """n x n float64 matrix of `squared_distance` between every pair of states."""
    n = len(states)
    distances = torch.zeros((n, n), dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            distances[i, j] = distances[j, i] = squared_distance(states[i], states[j])
    return distances


def krum_scores(distances: Tensor, num_byzantine: int) -> Tensor:
    """Krum score of each point: the sum of its n - f - 2 smallest distances to the others."""
    n = distances.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=distances.dtype)
    num_closest = min(n - 1, max(1, n - num_byzantine - 2))
    others = distances.clone().fill_diagonal_(float("inf"))
    return others.sort(dim=1).values[:, :num_closest].sum(dim=1)


def krum_select(distances: Tensor, num_byzantine: int, num_selected: int = 1) -> list[int]:
    """Indices of the `num_selected` lowest Krum scores (multi-Krum).

    Equal scores are common (two mutual nearest neighbours score alike when one distance
    counts, as in Bulyan's last picks), so ties go to the point whose sorted distances to
    the others are smaller, then to the lower index: the choice never depends on the order
    the updates arrived in, unless two points are exactly alike.
    """
    scores = krum_scores(distances, num_byzantine).tolist()
    others = distances.clone().fill_diagonal_(float("inf")).sort(dim=1).values.tolist()
    order = sorted(range(len(scores)), key=lambda i: (scores[i], others[i], i))
    return order[: max(1, num_selected)]


# -- server optimisers (Reddi et al., "Adaptive Federated Optimization", Algorithm 2) --


def first_moment(m: Tensor, delta: Tensor, beta_1: float) -> Tensor:
    """m_t = beta_1 * m + (1 - beta_1) * delta."""
    return m * beta_1 + delta * (1.0 - beta_1)


def adagrad_second_moment(v: Tensor, delta: Tensor) -> Tensor:
    """v_t = v + delta^2."""
    return v + delta.square()


def adam_second_moment(v: Tensor, delta: Tensor, beta_2: float) -> Tensor:
    """v_t = beta_2 * v + (1 - beta_2) * delta^2."""
    return v * beta_2 + delta.square() * (1.0 - beta_2)


def yogi_second_moment(v: Tensor, delta: Tensor, beta_2: float) -> Tensor:
    """v_t = v - (1 - beta_2) * delta^2 * sign(v - delta^2)."""
    sq = delta.square()
    return v - sq * torch.sign(v - sq) * (1.0 - beta_2)


def adaptive_step(x: Tensor, m: Tensor, v: Tensor, eta: float, tau: float) -> Tensor:
    """x_{t+1} = x + eta * m / (sqrt(v) + tau)."""
    return x + eta * m / (v.sqrt() + tau)


def server_momentum(v: Tensor, delta: Tensor, momentum: float) -> Tensor:
    """v_t = momentum * v + delta (Hsu et al., 2019; heavy ball on the pseudo-gradient)."""
    return v * momentum + delta


# -- Bulyan (El Mhamdi et al., "The Hidden Vulnerability of Distributed Learning in
# Byzantium", 2018) -------------------------------------------------------------------


def bulyan_select(distances: Tensor, num_byzantine: int) -> list[int]:
    """Indices of the theta = n - 2f updates Krum picks one at a time, each from those left."""
    remaining = list(range(distances.shape[0]))
    chosen: list[int] = []
    for _ in range(distances.shape[0] - 2 * num_byzantine):
        sub = distances[remaining][:, remaining]
        best = remaining[krum_select(sub, num_byzantine)[0]]
        chosen.append(best)
        remaining.remove(best)
    return chosen


def mean_around_median(stack: Tensor, num_kept: int) -> Tensor:
    """Coordinate-wise mean of the `num_kept` values closest to the coordinate median."""
    distance = (stack - coordinate_median(stack)).abs()
    closest = distance.sort(dim=0, stable=True).indices[:num_kept]
    return stack.gather(0, closest).mean(dim=0)


# -- geometric median (Pillutla et al., "Robust Aggregation for Federated Learning",
# 2022, the smoothed Weiszfeld algorithm of RFA) ------------------------------------------


def distances_to(stacks: Mapping[str, Tensor], point: Mapping[str, Tensor]) -> Tensor:
    """Euclidean distance (float64) of each stacked state to `point`, over all tensors."""
    total: Tensor | None = None
    for name, stack in stacks.items():
        diff = (stack - point[name].unsqueeze(0)).to(torch.float64)
        part = diff.reshape(diff.shape[0], -1).square().sum(dim=1)
        total = part if total is None else total + part
    assert total is not None, "distances_to needs at least one tensor"
    return total.sqrt()


def geometric_median(
    stacks: Mapping[str, Tensor], weights: Tensor, *, nu: float, max_iter: int, eps: float
) -> tuple[dict[str, Tensor], int]:
    """Smoothed Weiszfeld: argmin_z sum_i a_i max(nu, ||z - w_i||), started at the weighted
    mean; stops after `max_iter` steps or when a step moves the point by at most `eps`
    times its norm (or by nu). Returns the point and the number of steps taken.

    The stop looks at the point, not at the objective: one far outlier dominates the
    objective, so a relative objective tolerance would stop while the point still moves.
    """
    alpha = weights.to(torch.float64)
    alpha = alpha / alpha.sum() if float(alpha.sum()) > 0.0 else torch.ones_like(alpha)
    point = {name: weighted_mean(stack, alpha) for name, stack in stacks.items()}
    steps = 0
    while steps < max_iter:
        beta = alpha / distances_to(stacks, point).clamp(min=nu)
        moved = {name: weighted_mean(stack, beta / beta.sum()) for name, stack in stacks.items()}
        step, size = _distance_and_norm(moved, point)
        point, steps = moved, steps + 1
        if step <= max(eps * size, nu):
            break
    return point, steps


def _distance_and_norm(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> tuple[float, float]:
    """||a - b|| and ||a|| over all tensors, in float64."""
    return math.sqrt(squared_distance(a, b)), math.sqrt(
        sum(float(t.to(torch.float64).square().sum()) for t in a.values())
    )
