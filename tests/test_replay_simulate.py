"""What-if: recorded durations replayed through coordinator.scheduling and coordinator.quorum."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

import coordinator.scheduling
from coordinator.settings import CoordinatorSettings
from replay.errors import UsageError
from replay.events import read_log
from replay.model import Run
from replay.profile import build_profile, default_round_size
from replay.simulate import Simulation
from replay.timeline import rebuild_runs
from replay.whatif import grid_settings, parse_grid, predict, predict_grid, recorded_setting

FIXTURES = Path(__file__).parent / "fixtures" / "replay"
SYNTHETIC = ["synth_1slot.jsonl", "synth_3slot.jsonl"]
# Real coordinator logs (Fashion-MNIST, 6 clients, 2 local agents with one CPU trainer each,
# --max-steps 60, 4 rounds): the same job with --slots 3 and --slots 1.
REAL = ["real_3slot.jsonl", "real_1slot.jsonl"]


def _run(name: str) -> Run:
    return rebuild_runs(read_log(FIXTURES / name))[0]


def test_grid_parsing_combines_keys() -> None:
    """KEY=V1,V2 items become a grid; values are typed and checked."""
    grid = parse_grid(["slots=1,2,3", "policy=partition,greedy", "quorum=1.0,0.5"])
    assert grid == {"slots": [1, 2, 3], "policy": ["partition", "greedy"], "quorum": [1.0, 0.5]}
    base = recorded_setting(build_profile(_run("synth_3slot.jsonl")))
    assert len(grid_settings(base, grid, expected_clients=6)) == 12


@pytest.mark.parametrize("item", ["slots", "slots=", "slots=0", "quorum=1.5", "policy=random",
                                  "speed=2"])
def test_bad_grid_items_are_usage_errors(item: str) -> None:
    """A malformed or out-of-range what-if value is a clear usage error."""
    with pytest.raises(UsageError):
        parse_grid([item])


def test_default_round_size_follows_the_coordinators_rule() -> None:
    """Changing slots re-derives clients per round exactly as CoordinatorSettings does."""
    for slots in range(1, 8):
        settings = CoordinatorSettings(run_id="x", slots=slots, expected_clients=6)
        assert default_round_size(6, slots) == settings.round_size


@pytest.mark.parametrize("name", SYNTHETIC + REAL)
def test_recorded_setting_is_predicted_within_ten_percent(name: str) -> None:
    """Replaying a run's own setting reproduces its wall time within 10%."""
    whatif = predict_grid(_run(name), {})
    assert whatif.predictions[0].recorded_setting
    assert whatif.recorded_error is not None
    assert abs(whatif.recorded_error) <= 0.10, whatif.recorded_error


def test_simulation_drives_the_coordinators_client_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """The leases come from coordinator.scheduling.ClientPool.assign, not a copy of it."""
    calls: list[float] = []
    original = coordinator.scheduling.ClientPool.assign

    def spy(self: coordinator.scheduling.ClientPool, now: float) -> object:
        calls.append(now)
        return original(self, now)

    monkeypatch.setattr(coordinator.scheduling.ClientPool, "assign", spy)
    profile = build_profile(_run("synth_3slot.jsonl"))
    result = Simulation(profile, recorded_setting(profile), random.Random(0)).run()
    assert result.finished
    assert result.slot_rounds == 24
    assert len(calls) > 24


def test_same_seed_same_prediction() -> None:
    """Predictions are deterministic for a seed and change with it."""
    profile = build_profile(_run("synth_3slot.jsonl"))
    setting = recorded_setting(profile)
    first = predict(profile, setting, seed=1, repeats=2, draw="random")
    assert predict(profile, setting, seed=1, repeats=2, draw="random") == first
    assert predict(profile, setting, seed=2, repeats=2, draw="random").wall_s != first.wall_s


def test_lower_quorum_is_not_slower() -> None:
    """Closing on half the clients never waits longer than waiting for all."""
    run = _run("synth_1slot.jsonl")
    whatif = predict_grid(run, parse_grid(["quorum=1.0,0.5"]))
    by_quorum = {p.setting["quorum"]: p.wall_s for p in whatif.predictions}
    assert by_quorum[0.5] < by_quorum[1.0]


def test_more_slots_do_more_rounds_per_hour() -> None:
    """With clients to spare, more slots close more slot-rounds per hour."""
    whatif = predict_grid(_run("synth_1slot.jsonl"), parse_grid(["slots=1,3"]))
    rate = {p.setting["slots"]: p.slot_rounds_per_hour for p in whatif.predictions}
    assert rate[3] > 2 * rate[1]
    three = next(p for p in whatif.predictions if p.setting["slots"] == 3)
    assert three.setting["clients_per_round"] == 2  # ceil(6 / 3): the coordinator's default


def test_shared_trainers_queue_jobs() -> None:
    """One trainer per agent: jobs of its clients run one after another, so rounds stretch."""
    profile = build_profile(_run("synth_1slot.jsonl"))
    setting = recorded_setting(profile)
    free = Simulation(profile, setting, random.Random(0)).run()
    single = dataclasses.replace(profile, trainers={"agent-0": 1, "agent-1": 1})
    queued = Simulation(single, setting, random.Random(0)).run()
    assert queued.span_s > 2 * free.span_s


@pytest.mark.parametrize(("source", "target"), [("real_3slot.jsonl", "real_1slot.jsonl"),
                                                ("real_1slot.jsonl", "real_3slot.jsonl")])
def test_other_slot_count_is_predicted_from_a_real_log(source: str, target: str) -> None:
    """On the real fixtures, one run's log predicts the other slot count within 10%."""
    actual = _run(target)
    slots = int(str(actual.config["slots"]))
    whatif = predict_grid(_run(source), {"slots": [slots]})
    predicted = next(p for p in whatif.predictions if p.setting["slots"] == slots)
    assert predicted.wall_s == pytest.approx(actual.wall_s, rel=0.10)


def _partners(name: str, choice: str) -> dict[int, set[str]]:
    """The clients each slot trained with when the run is replayed with `choice`."""
    profile = build_profile(_run(name))
    setting = dataclasses.replace(recorded_setting(profile), client_choice=choice, rounds=10)
    sim = Simulation(profile, setting, random.Random(0))
    seen: dict[int, set[str]] = {}
    open_round = sim._open_round

    def record(slot, clients):  # type: ignore[no-untyped-def]
        seen.setdefault(slot.slot_id, set()).update(clients)
        open_round(slot, clients)

    sim._open_round = record  # type: ignore[method-assign]
    assert sim.run().finished
    return seen


def test_client_choice_is_replayed_as_recorded_and_can_be_varied() -> None:
    """A log from before --client-choice replays in policy order; the grid can ask for
    least-used, which spreads each slot over more of the clients, as in the coordinator."""
    profile = build_profile(_run("real_3slot.jsonl"))
    assert recorded_setting(profile).client_choice == "policy-order"
    logged = dataclasses.replace(profile, config={**profile.config, "client_choice": "least-used"})
    assert recorded_setting(logged).client_choice == "least-used"
    assert parse_grid(["client_choice=least-used,policy-order"]) == {
        "client_choice": ["least-used", "policy-order"]}
    with pytest.raises(UsageError):
        parse_grid(["client_choice=random"])
    ordered, spread = _partners("real_3slot.jsonl", "policy-order"), _partners(
        "real_3slot.jsonl", "least-used")
    assert sum(map(len, spread.values())) > sum(map(len, ordered.values()))
