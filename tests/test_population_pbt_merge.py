"""PBT decisions and copies, merges and the greedy soup, and the events the hook logs."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import pytest
import torch
from structlog.testing import capture_logs

from coordinator.population import merge, pbt
from coordinator.population.config import Base, SlotConfig, resolve
from coordinator.population.hooks import Population, Snapshot
from coordinator.settings import TrainingSettings
from coordinator.strategies import FedAdam, Strategy, make_strategy

SETTINGS = pbt.PbtSettings(every=2, fraction=0.25)


def members(*scores: float) -> dict[int, pbt.Member]:
    return {i: pbt.Member(i, s, 4) for i, s in enumerate(scores)}


def test_bottom_slot_exploits_a_top_slot_and_others_do_not() -> None:
    """Only the bottom fraction exploits, and always a slot from the top fraction."""
    population = members(0.8, 0.6, 0.7, 0.9)
    exploit = pbt.decide(1, population, SETTINGS, random.Random(0))
    assert exploit is not None
    assert (exploit.target.slot_id, exploit.donor.slot_id) == (1, 3)
    assert [pbt.decide(s, population, SETTINGS, random.Random(0)) for s in (0, 2, 3)] == [
        None, None, None]


def test_no_exploit_without_a_better_slot_or_an_evaluation() -> None:
    """Equal scores, a lone slot, or a slot not yet evaluated: nothing to copy."""
    assert pbt.decide(1, members(0.5, 0.5), SETTINGS, random.Random(0)) is None
    assert pbt.decide(0, members(0.5), SETTINGS, random.Random(0)) is None
    assert pbt.decide(5, members(0.5, 0.9), SETTINGS, random.Random(0)) is None


def test_explore_perturbs_only_bounded_keys_within_bounds() -> None:
    """Bounded numbers move by a factor and are clipped; integers stay integers."""
    before = {"lr": 0.9, "batch_size": 32, "momentum": 0.9, "strategy": "fedavg"}
    bounds = {"lr": (0.001, 1.0), "batch_size": (8.0, 33.0)}
    for seed in range(20):
        after = pbt.explore(before, bounds, SETTINGS, random.Random(seed))
        assert 0.001 <= float(after["lr"]) <= 1.0  # type: ignore[arg-type]
        assert isinstance(after["batch_size"], int)
        assert 8 <= after["batch_size"] <= 33
        assert (after["momentum"], after["strategy"]) == (0.9, "fedavg")
    assert pbt.changed({"lr": 0.1, "seed": 1}, {"lr": 0.2, "seed": 1}) == {"lr": [0.1, 0.2]}


def _stepped_fedadam() -> tuple[FedAdam, dict[str, torch.Tensor]]:
    strategy = FedAdam(eta=0.1)
    model = {"w": torch.zeros(3, 2), "steps": torch.tensor(0, dtype=torch.int64)}
    agg = strategy.begin_round(model)
    strategy.fold(agg, {"w": torch.randn(3, 2), "steps": torch.tensor(4)}, num_examples=5)
    return strategy, strategy.finalize(agg, model)


def test_exploit_copies_weights_and_optimiser_state_exactly() -> None:
    """The copy equals the donor's weights and server moments, and is not shared with them."""
    donor, weights = _stepped_fedadam()
    state, strategy = pbt.exploit_copy(weights, donor.state_dict(), "fedadam", {"eta": 0.1})
    assert isinstance(strategy, FedAdam)
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    copied = strategy.state_dict()
    assert copied.keys() == donor.state_dict().keys()
    assert all(torch.equal(copied[k], donor.state_dict()[k]) for k in copied)
    state["w"].add_(1.0)
    strategy.m["w"].add_(1.0)  # type: ignore[union-attr]
    assert not torch.equal(state["w"], weights["w"])
    assert not torch.equal(strategy.m["w"], donor.m["w"])


def test_merge_is_the_weighted_mean() -> None:
    """weighted_average equals sum(w_i x_i) / sum(w_i); integer buffers are rounded."""
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(2)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(6)}
    merged = merge.weighted_average([a, b], [1.0, 3.0])
    assert torch.allclose(merged["w"], (1 * a["w"] + 3 * b["w"]) / 4)
    assert merged["n"].dtype == torch.int64
    assert int(merged["n"]) == 5
    assert torch.allclose(merge.weighted_average([a, b], [0.0, 0.0])["w"], (a["w"] + b["w"]) / 2)
    with pytest.raises(ValueError, match="negative"):
        merge.weighted_average([a, b], [1.0, -1.0])


def test_with_progress_keeps_what_a_slot_learnt_after_the_merge() -> None:
    """merged + (current - taken): a slot's rounds past the merge are not lost."""
    merged = {"w": torch.tensor([1.0])}
    out = merge.with_progress(merged, {"w": torch.tensor([5.0])}, {"w": torch.tensor([3.0])})
    assert torch.equal(out["w"], torch.tensor([3.0]))


def test_greedy_soup_keeps_a_candidate_only_if_accuracy_does_not_drop() -> None:
    """Best first; a candidate that lowers the soup's accuracy is left out."""
    candidates = {0: ({"w": torch.tensor([0.0])}, 0.7), 1: ({"w": torch.tensor([2.0])}, 0.9),
                  2: ({"w": torch.tensor([10.0])}, 0.8)}

    def evaluate(state: dict[str, torch.Tensor]) -> float:
        return 1.0 - abs(float(state["w"]) - 1.0) / 10  # best at w = 1

    soup = merge.greedy_soup(candidates, evaluate)
    assert soup.members == (1, 0)  # 2 tried second and dropped the accuracy
    assert [key for key, _ in soup.tried] == [2, 0]
    assert torch.equal(soup.state["w"], torch.tensor([1.0]))
    assert soup.accuracy == pytest.approx(1.0)


# -- the round-boundary hook, with stand-in slots -------------------------------------------


@dataclass
class FakeStatus:
    accuracies: deque[tuple[int, float, float]] = field(default_factory=deque)


@dataclass
class FakeSlot:
    slot_id: int
    config: SlotConfig | None
    strategy: Strategy
    latest: Snapshot | None = None
    status: FakeStatus = field(default_factory=FakeStatus)
    replaced: list[tuple[dict[str, torch.Tensor], Strategy, SlotConfig, int]] = field(
        default_factory=list)

    async def settle(self) -> None:
        return None

    async def replace_model(self, state: dict[str, torch.Tensor], strategy: Strategy,
                            config: SlotConfig, round_: int) -> None:
        self.replaced.append((state, strategy, config, round_))
        self.config, self.strategy = config, strategy
        self.latest = Snapshot(round_, state, strategy.state_dict(), 0)


def fake_slots(scores: list[float], strategy: str = "fedavg") -> dict[int, FakeSlot]:
    base = Base(TrainingSettings(lr=0.05), strategy, {}, 2, 0)
    slots = {}
    for i, score in enumerate(scores):
        slot = FakeSlot(i, resolve(base, i, {"lr": 0.01 * (i + 1)}), make_strategy(strategy))
        slot.latest = Snapshot(2, {"w": torch.full((2,), float(i))}, {}, 10 * (i + 1))
        slot.status.accuracies.append((2, score, 1.0))
        slots[i] = slot
    return slots


async def test_pbt_exploit_and_explore_events_are_complete() -> None:
    """An exploited slot takes the donor's model and config (its own seed) and logs both steps."""
    slots = fake_slots([0.9, 0.5, 0.7])
    population = Population(slots=slots, last_round=10, pbt_settings=SETTINGS,
                            bounds={"lr": (0.001, 1.0)}, rng=random.Random(1))
    with capture_logs() as logs:
        for slot in slots.values():
            await population.round_closed(slot, 2)
    exploit = [e for e in logs if e["event"] == "pbt_exploit"]
    explore = [e for e in logs if e["event"] == "pbt_explore"]
    assert len(exploit) == len(explore) == 1
    assert {k: exploit[0][k] for k in ("slot_id", "round", "donor_slot_id", "donor_round",
                                       "donor_evaluated_round", "donor_accuracy", "accuracy")} == {
        "slot_id": 1, "round": 2, "donor_slot_id": 0, "donor_round": 2,
        "donor_evaluated_round": 2, "donor_accuracy": 0.9, "accuracy": 0.5}
    assert exploit[0]["copied"]["lr"] == 0.01
    assert exploit[0]["copied"]["seed"] == 1
    state, _strategy, config, round_ = slots[1].replaced[0]
    assert torch.equal(state["w"], slots[0].latest.state["w"])  # type: ignore[union-attr]
    assert config.flat() == explore[0]["config"]
    assert set(explore[0]["changed"]) <= {"lr"}
    assert round_ == 2
    assert slots[0].replaced == slots[2].replaced == []


async def test_periodic_merge_waits_for_every_slot_and_logs_it() -> None:
    """The round-K models are averaged by examples once all slots closed round K; each slot
    adopts the average at its boundary."""
    slots = fake_slots([0.9, 0.5, 0.7])
    population = Population(slots=slots, last_round=10, merge_every=2)
    with capture_logs() as logs:
        for slot in slots.values():
            await population.round_closed(slot, 2)
    merged = [e for e in logs if e["event"] == "slots_merged"]
    assert len(merged) == 1
    assert merged[0]["weights"] == {"0": 10.0, "1": 20.0, "2": 30.0}
    expected = (0 * 10 + 1 * 20 + 2 * 30) / 60
    assert [e["slot_id"] for e in logs if e["event"] == "merge_adopted"] == [2]
    assert torch.allclose(slots[2].replaced[0][0]["w"], torch.full((2,), expected))
    for slot in (slots[0], slots[1]):  # the others adopt at their next boundary
        slot.latest = Snapshot(3, {"w": slot.latest.state["w"] + 1}, {}, 10)  # type: ignore[union-attr]
        await population.round_closed(slot, 3)
        assert torch.allclose(slot.replaced[0][0]["w"], torch.full((2,), expected + 1))


async def test_a_failed_slot_is_no_donor_and_merges_go_on_without_it() -> None:
    """After slot_failed, a merge waiting only for that slot happens with the others, and PBT
    never copies the failed slot, even when it scored best."""
    slots = fake_slots([0.9, 0.5, 0.7])
    population = Population(slots=slots, last_round=10, merge_every=2)
    with capture_logs() as logs:
        await population.round_closed(slots[1], 2)
        await population.round_closed(slots[2], 2)
        assert not [e for e in logs if e["event"] == "slots_merged"]
        await population.slot_failed(0, 2)
    merged = [e for e in logs if e["event"] == "slots_merged"]
    assert [e["slot_ids"] for e in merged] == [[1, 2]]
    assert set(population.members()) == {1, 2}
