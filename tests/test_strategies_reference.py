"""Several rounds of each stateful rule against plain numpy float64 written from its paper.

Reddi et al. 2021 Algorithm 2 (FedAdam, FedYogi, FedAdagrad), Flower 1.41's variant of
them (``flower_compat``), Hsu et al. 2019 (FedAvgM), El Mhamdi et al. 2018 (Bulyan) and
Pillutla et al. 2022 (RFA's smoothed Weiszfeld). Each test prints the largest absolute
difference it found (``pytest -s`` shows them) and names it in its assertion message.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from coordinator.strategies import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedYogi,
    GeometricMedian,
    Strategy,
)

Array = NDArray[np.float64]
ROUNDS, CLIENTS = 6, 5
SHAPES = {"w": (3, 4), "b": (4,)}


def report(line: str) -> None:
    """Show a measured difference: the closing note quotes these (``pytest -s``)."""
    print(line)  # noqa: T201 - the numbers are the test's output, not debugging


def flat(state: dict[str, torch.Tensor]) -> Array:
    return np.concatenate([state[name].double().numpy().ravel() for name in SHAPES])


def unflat(vector: Array, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, shape in SHAPES.items():
        size = int(np.prod(shape))
        out[name] = torch.from_numpy(vector[start : start + size].reshape(shape).copy()).to(dtype)
        start += size
    return out


def client_rounds(seed: int) -> list[tuple[list[Array], list[int]]]:
    """Per round: each client's model as an offset from the round's global (applied later),
    and its num_examples."""
    rng = np.random.default_rng(seed)
    size = sum(int(np.prod(s)) for s in SHAPES.values())
    return [
        ([rng.normal(0.3, 1.0, size) for _ in range(CLIENTS)],
         [int(k) for k in rng.integers(1, 100, CLIENTS)])
        for _ in range(ROUNDS)
    ]  # fmt: skip


def run_strategy(
    strategy: Strategy, x0: Array, rounds: list[tuple[list[Array], list[int]]], dtype: torch.dtype
) -> list[Array]:
    """The global model after each round; clients return global + their offset."""
    state, history = unflat(x0, dtype), []
    for offsets, examples in rounds:
        x = flat(state)
        agg = strategy.begin_round(state)
        for offset, n in zip(offsets, examples, strict=True):
            strategy.fold(agg, unflat(x + offset, dtype), n)
        state = strategy.finalize(agg, state)
        history.append(flat(state))
    return history


def run_reference(
    step: Callable[[Array, Array, int], Array],
    x0: Array,
    rounds: list[tuple[list[Array], list[int]]],
) -> list[Array]:
    """The reference's global model after each round; `step(x, delta, t)` is the server's."""
    x, history = x0.copy(), []
    for t, (offsets, examples) in enumerate(rounds, start=1):
        weights = np.asarray(examples, dtype=np.float64)
        mean = sum(w * (x + o) for w, o in zip(weights, offsets, strict=True)) / weights.sum()
        x = step(x, mean - x, t)
        history.append(x.copy())
    return history


def reddi(
    second: str,
    eta: float,
    b1: float,
    b2: float,
    tau: float,
    *,
    v0: float | None = None,
    flower_adam: bool = False,
) -> Callable[..., Array]:
    """Reddi et al. Algorithm 2's server step (v starts at tau^2); with `v0` and
    `flower_adam`, Flower 1.41's: v from 0, eta scaled by its bias correction at round+1."""
    moments: dict[str, Array] = {}

    def step(x: Array, delta: Array, t: int) -> Array:
        m = moments.get("m", np.zeros_like(x))
        v = moments.get("v", np.full_like(x, tau**2 if v0 is None else v0))
        m = b1 * m + (1 - b1) * delta
        if second == "adam":
            v = b2 * v + (1 - b2) * delta**2
        elif second == "yogi":
            v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
        else:
            v = v + delta**2
        moments["m"], moments["v"] = m, v
        lr = eta
        if flower_adam:
            lr = eta * np.sqrt(1 - b2 ** (t + 1.0)) / (1 - b1 ** (t + 1.0))
        return x + lr * m / (np.sqrt(v) + tau)

    return step


def hsu(server_lr: float, beta: float, nesterov: bool = False) -> Callable[..., Array]:
    """Hsu et al. 2019: v = beta v + delta; x = x + lr v (Nesterov: x + lr (beta v + delta))."""
    held: dict[str, Array] = {}

    def step(x: Array, delta: Array, t: int) -> Array:
        v = beta * held.get("v", np.zeros_like(x)) + delta
        held["v"] = v
        return x + server_lr * (beta * v + delta if nesterov else v)

    return step


CASES = [
    ("fedadam", lambda: FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3),
     lambda: reddi("adam", 0.1, 0.9, 0.99, 1e-3)),
    ("fedadam default tau", lambda: FedAdam(),
     lambda: reddi("adam", 0.1, 0.9, 0.99, 1e-9)),
    ("fedyogi", lambda: FedYogi(),
     lambda: reddi("yogi", 1e-2, 0.9, 0.99, 1e-3)),
    ("fedadagrad", lambda: FedAdagrad(eta=0.1, beta_1=0.5, tau=1e-2),
     lambda: reddi("adagrad", 0.1, 0.5, 0.0, 1e-2)),
    ("fedadam flower_compat", lambda: FedAdam(flower_compat=True),
     lambda: reddi("adam", 0.1, 0.9, 0.99, 1e-9, v0=0.0, flower_adam=True)),
    ("fedyogi flower_compat", lambda: FedYogi(flower_compat=True),
     lambda: reddi("yogi", 1e-2, 0.9, 0.99, 1e-3, v0=0.0)),
    ("fedadagrad flower_compat", lambda: FedAdagrad(flower_compat=True),
     lambda: reddi("adagrad", 0.1, 0.0, 0.0, 1e-9, v0=0.0)),
    ("fedavgm", lambda: FedAvgM(), lambda: hsu(1.0, 0.9)),
    ("fedavgm lr 0.3 m 0.5", lambda: FedAvgM(server_lr=0.3, momentum=0.5),
     lambda: hsu(0.3, 0.5)),
    ("fedavgm nesterov", lambda: FedAvgM(server_lr=0.5, nesterov=True),
     lambda: hsu(0.5, 0.9, nesterov=True)),
]  # fmt: skip


@pytest.mark.parametrize(("label", "ours", "paper"), CASES, ids=[c[0] for c in CASES])
def test_stateful_rule_matches_its_paper_over_six_rounds(
    label: str, ours: Callable[[], Strategy], paper: Callable[[], Callable[..., Array]]
) -> None:
    """Six rounds of five weighted clients: float64 equals the paper's numpy to 1e-12,
    float32 to 1e-4 relative (the state is carried across every round)."""
    rounds = client_rounds(seed=len(label))
    x0 = np.random.default_rng(7).normal(0.0, 1.0, 16)
    expected = run_reference(paper(), x0, rounds)
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        got = run_strategy(ours(), x0, rounds, dtype)
        diff = max(float(np.max(np.abs(g - e))) for g, e in zip(got, expected, strict=True))
        scale = max(float(np.max(np.abs(e))) for e in expected)
        report(f"{label} {dtype}: max |ours - paper| over {ROUNDS} rounds = {diff:.3e}")
        assert diff <= tolerance * max(1.0, scale), f"{label} {dtype}: max abs diff {diff:.3e}"


def test_fedavgm_state_survives_a_checkpoint() -> None:
    """A FedAvgM restored from state_dict after round 3 goes on exactly as the original."""
    rounds = client_rounds(seed=3)
    x0 = np.zeros(16)
    original = FedAvgM(server_lr=0.7, momentum=0.8)
    run_strategy(original, x0, rounds[:3], torch.float64)
    restored = FedAvgM(server_lr=0.7, momentum=0.8)
    restored.load_state_dict(original.state_dict())
    assert restored.step == 3
    later = run_strategy(original, x0, rounds[3:], torch.float64)
    again = run_strategy(restored, x0, rounds[3:], torch.float64)
    assert all(np.array_equal(a, b) for a, b in zip(later, again, strict=True))


# -- non-linear rules against a direct numpy transcription of their papers -------------


def bulyan_by_paper(points: list[Array], f: int) -> Array:
    """El Mhamdi et al. 2018: theta = n - 2f Krum picks, then beta = theta - 2f closest
    to the coordinate median, averaged; equal Krum scores go to the point whose sorted
    distances are smaller (our documented tie rule)."""
    remaining = list(range(len(points)))
    picked: list[Array] = []
    for _ in range(len(points) - 2 * f):
        scores = []
        for i in remaining:
            d = sorted(float(np.sum((points[i] - points[j]) ** 2)) for j in remaining if j != i)
            # The paper leaves ties open; they are common (with one neighbour counted, two
            # mutual nearest neighbours tie), so ours go to the smaller sorted distances.
            scores.append((sum(d[: max(1, len(remaining) - f - 2)]), d, i))
        best = min(scores)[2]
        picked.append(points[best])
        remaining.remove(best)
    stack = np.stack(picked)
    beta = len(picked) - 2 * f
    median = np.median(stack, axis=0)
    out = np.empty(stack.shape[1])
    for c in range(stack.shape[1]):
        closest = np.argsort(np.abs(stack[:, c] - median[c]), kind="stable")[:beta]
        out[c] = stack[closest, c].mean()
    return out


def weiszfeld_by_paper(points: list[Array], alpha: Array, nu: float, iters: int) -> Array:
    """Pillutla et al. 2022, Algorithm 3 (smoothed Weiszfeld), from the weighted mean."""
    a = alpha / alpha.sum()
    z = sum(ai * p for ai, p in zip(a, points, strict=True))
    for _ in range(iters):
        beta = np.array(
            [ai / max(nu, float(np.linalg.norm(z - p))) for ai, p in zip(a, points, strict=True)]
        )
        z = sum(b * p for b, p in zip(beta, points, strict=True)) / beta.sum()
    return z


def one_round(
    strategy: Strategy, points: list[Array], examples: list[int], dtype: torch.dtype
) -> Array:
    start = unflat(np.zeros(16), dtype)
    agg = strategy.begin_round(start)
    for p, n in zip(points, examples, strict=True):
        strategy.fold(agg, unflat(p, dtype), n)
    return flat(strategy.finalize(agg, start))


@pytest.mark.parametrize("f", [1, 2])
def test_bulyan_matches_the_paper(f: int) -> None:
    """Bulyan over 4f + 3 updates (and more) equals the paper's steps in numpy."""
    rng = np.random.default_rng(f)
    worst = 0.0
    for n in (4 * f + 3, 4 * f + 6):
        points = [rng.normal(0, 1, 16) for _ in range(n - f)]
        points += [rng.normal(5, 20, 16) for _ in range(f)]
        expected = bulyan_by_paper(points, f)
        for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            got = one_round(Bulyan(num_byzantine=f), points, [1] * n, dtype)
            diff = float(np.max(np.abs(got - expected)))
            worst = max(worst, diff) if dtype == torch.float64 else worst
            report(f"bulyan f={f} n={n} {dtype}: max |ours - paper| = {diff:.3e}")
            assert diff <= tolerance, f"bulyan f={f} n={n} {dtype}: max abs diff {diff:.3e}"


def test_geometric_median_matches_weiszfeld_and_minimises() -> None:
    """RFA's geometric median equals the paper's smoothed Weiszfeld run for as many steps,
    and no input point has a smaller weighted sum of distances."""
    rng = np.random.default_rng(11)
    points = [rng.normal(0, 1, 16) for _ in range(7)] + [rng.normal(50, 1, 16)] * 2
    examples = [int(k) for k in rng.integers(1, 50, len(points))]
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        strategy = GeometricMedian(weighted=True)  # RFA's alpha_i (the default is uniform)
        got = one_round(strategy, points, examples, dtype)
        expected = weiszfeld_by_paper(
            points, np.asarray(examples, float), 1e-6, strategy.last_iterations
        )
        diff = float(np.max(np.abs(got - expected)))
        report(
            f"geomed {dtype}: {strategy.last_iterations} Weiszfeld steps, "
            f"max |ours - paper| = {diff:.3e}"
        )
        assert diff <= tolerance, f"geomed {dtype}: max abs diff {diff:.3e}"
    alpha = np.asarray(examples, float)

    def objective(z: Array) -> float:
        return float(sum(a * np.linalg.norm(z - p) for a, p in zip(alpha, points, strict=True)))

    assert objective(got) <= min(objective(p) for p in points)
    converged = weiszfeld_by_paper(points, alpha, 1e-6, 1000)
    assert objective(got) <= objective(converged) * (1 + 1e-5)
