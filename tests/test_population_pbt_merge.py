"""PBT decisions and copies, merges and the greedy soup, and the events the hook logs."""

from __future__ import annotations

import random
import tempfile
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from coordinator.checkpoints import CheckpointStore
from coordinator.population import final, merge, pbt
from coordinator.population.config import Base, SlotConfig, resolve
from coordinator.population.hooks import Population, Snapshot
from coordinator.results.figures import Validation
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


def _scorer(scores: dict[str, float], best_at: float) -> Callable[
        [str, dict[str, torch.Tensor]], Awaitable[Validation | None]]:
    """A stand-in for federated evaluation: a model's validation accuracy is highest at
    w = `best_at`; every call is recorded in `scores` by candidate name."""
    async def score(name: str, state: dict[str, torch.Tensor]) -> Validation | None:
        scores[name] = 1.0 - abs(float(state["w"]) - best_at) / 10
        return Validation(0, scores[name], None, 100, 3)
    return score


async def test_final_selection_keeps_a_soup_member_only_if_validation_does_not_drop() -> None:
    """Slots scored, then the average, then the soup best first: a member that lowers the
    soup's validation accuracy is left out; the best-scoring candidate is kept."""
    finals = {0: {"w": torch.tensor([0.0])}, 1: {"w": torch.tensor([2.0])},
              2: {"w": torch.tensor([10.0])}}
    scores: dict[str, float] = {}
    selection = await final.select(finals, _scorer(scores, best_at=1.0))
    assert selection is not None
    assert list(scores) == ["slot 0", "slot 1", "slot 2", "average", "soup +1", "soup +2"]
    assert selection.soup_members == (0, 1)  # slots 0 and 1 tie at 0.9: the lower id first
    assert [key for key, _ in selection.soup_tried] == [1, 2]  # +2 lowers it: left out
    assert selection.kept == "soup"
    assert torch.equal(selection.state["w"], torch.tensor([1.0]))
    assert selection.score == pytest.approx(1.0)


async def test_final_selection_never_reads_the_test_set() -> None:
    """Label permutation: the same validation figures with a test set whose labels are
    permuted (so every test accuracy changes) give the same choice; the test evaluation
    runs once, on the kept model, after the choice."""
    finals = {0: {"w": torch.tensor([0.0])}, 1: {"w": torch.tensor([2.0])},
              2: {"w": torch.tensor([10.0])}}
    kept = []
    for permuted in (False, True):
        tested: list[float] = []

        async def test(state: dict[str, torch.Tensor], permuted: bool = permuted,
                       tested: list[float] = tested) -> dict[str, float]:
            tested.append(float(state["w"]))
            w = float(state["w"])
            return {"accuracy": (w % 7) / 7 if permuted else 1 - abs(w - 1) / 10}

        with tempfile.TemporaryDirectory() as tmp:
            store = CheckpointStore(Path(tmp), 2)
            with capture_logs() as logs:
                path = await final.run_final_merge(finals, _scorer({}, 1.0), "validation", test,
                                                   store)
            assert path is not None
            assert path.exists()
        event = next(e for e in logs if e["event"] == "final_merge")
        assert tested == [1.0]  # once, the kept model
        kept.append((event["kept"], event["validation_accuracy"], event["selected_on"]))
    assert kept[0] == kept[1] == ("soup", 1.0, "validation")


# -- the round-boundary hook, with stand-in slots -------------------------------------------


@dataclass
class FakeStatus:
    accuracies: deque[tuple[int, float, float]] = field(default_factory=deque)  # test set
    validations: deque[tuple[int, float, float]] = field(default_factory=deque)


@dataclass
class FakeSlot:
    slot_id: int
    config: SlotConfig | None
    strategy: Strategy
    latest: Snapshot | None = None
    status: FakeStatus = field(default_factory=FakeStatus)
    replaced: list[tuple[dict[str, torch.Tensor], Strategy, SlotConfig, int]] = field(
        default_factory=list)

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
        slot.status.validations.append((1, score, 1.0))  # round 2's clients scored round 1's
        slot.status.accuracies.append((2, 1.0 - score, 1.0))  # the test set ranks otherwise
        slots[i] = slot
    return slots


async def test_pbt_exploit_and_explore_events_are_complete() -> None:
    """An exploited slot takes the donor's model and config (its own seed) and logs both
    steps, with the rounds whose validation figures decided; the test set, which ranks the
    slots the other way round here, is never read."""
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
                                       "donor_validated_round", "validated_round",
                                       "donor_accuracy", "accuracy", "selected_on")} == {
        "slot_id": 1, "round": 2, "donor_slot_id": 0, "donor_round": 2,
        "donor_validated_round": 1, "validated_round": 1, "donor_accuracy": 0.9,
        "accuracy": 0.5, "selected_on": "validation"}
    assert exploit[0]["copied"]["lr"] == 0.01
    assert exploit[0]["copied"]["seed"] == 1
    state, _strategy, config, round_ = slots[1].replaced[0]
    assert torch.equal(state["w"], slots[0].latest.state["w"])  # type: ignore[union-attr]
    assert config.flat() == explore[0]["config"]
    assert set(explore[0]["changed"]) <= {"lr"}
    assert round_ == 2
    assert slots[0].replaced == slots[2].replaced == []


def _closing(population: Population, slots: dict[int, FakeSlot], examples: int = 10
             ) -> Callable[[int, int], Awaitable[None]]:
    """`close(slot, round)`: the slot closed `round` with `examples` folded (its model's w
    is slot * 100 + round) and called the hook."""
    async def close(slot_id: int, round_: int) -> None:
        slot = slots[slot_id]
        slot.latest = Snapshot(round_, {"w": torch.full((2,), 100.0 * slot_id + round_)}, {},
                               examples)
        await population.round_closed(slot, round_)
    return close


async def test_merge_weights_count_only_the_examples_the_merged_models_hold() -> None:
    """The weighting bug: 2 slots, 10 examples a round, merge every 2; slot 0 closes rounds
    1, 2, 3 before slot 1 closes round 2. Slot 1's merge weighs each slot by the examples it
    folded in rounds 1..2 (20 and 20), not slot 0's 30 of rounds 1..3."""
    slots = fake_slots([0.5, 0.5])
    population = Population(slots=slots, last_round=10, merge_every=2)
    close = _closing(population, slots)
    with capture_logs() as logs:
        for slot_id, round_ in [(0, 1), (1, 1), (0, 2), (0, 3), (1, 2)]:
            await close(slot_id, round_)
    merged = [e for e in logs if e["event"] == "slots_merged"]
    assert merged[-1]["weights"] == {"0": 20.0, "1": 20.0}


async def test_a_slot_merges_at_its_boundary_without_waiting_for_the_others() -> None:
    """Slot 0 reaches round 2 first: it folds the others' latest models (slot 1 at round 1,
    slot 2 not yet closed anything) into its own at once, weighted by what each folded in
    the window, and goes on from the average; slot 1 does the same when it gets there."""
    slots = fake_slots([0.9, 0.5, 0.7])
    population = Population(slots=slots, last_round=10, merge_every=2)
    close = _closing(population, slots)
    with capture_logs() as logs:
        await close(0, 1)
        await close(1, 1)
        await close(0, 2)
        first = [e for e in logs if e["event"] == "slots_merged"]
        assert [(e["slot_id"], e["slot_ids"], e["weights"], e["rounds"]) for e in first] == [
            (0, [0, 1], {"0": 20.0, "1": 10.0}, {"0": 2, "1": 1})]
        expected = (2.0 * 20 + 101.0 * 10) / 30
        assert torch.allclose(slots[0].replaced[0][0]["w"], torch.full((2,), expected))
        assert slots[1].replaced == slots[2].replaced == []
        await close(1, 2)  # slot 0's latest is now the average it went on from
        second = [e for e in logs if e["event"] == "slots_merged"][-1]
        assert (second["slot_id"], second["weights"], second["rounds"]) == (
            1, {"0": 20.0, "1": 20.0}, {"0": 2, "1": 2})
        assert torch.allclose(slots[1].replaced[0][0]["w"],
                              torch.full((2,), (expected + 102.0) / 2))


async def test_a_failed_slot_is_no_donor_and_no_merge_takes_its_model() -> None:
    """After slot_failed, merges go on without the failed slot's model and PBT never copies
    it, even when it scored best."""
    slots = fake_slots([0.9, 0.5, 0.7])
    population = Population(slots=slots, last_round=10, merge_every=2)
    close = _closing(population, slots)
    with capture_logs() as logs:
        await close(0, 2)
        await population.slot_failed(0, 2)
        await close(1, 2)
        await close(2, 2)
    merged = [e for e in logs if e["event"] == "slots_merged"]
    assert [e["slot_ids"] for e in merged] == [[1, 2]]
    assert merged[0]["slot_id"] == 2  # slot 1 had nobody to merge with yet
    assert set(population.members()) == {1, 2}
