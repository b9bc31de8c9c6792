"""Per-slot configuration: --slot-config TOML, --sweep grids, errors before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.cli import build_parser, settings_from_args
from coordinator.population.config import (
    MAX_SLOTS,
    Base,
    ConfigError,
    parse_sweep,
    read_file,
    resolve,
    run_configs,
    slot_overrides,
)
from coordinator.settings import CoordinatorSettings, TrainingSettings

BASE = Base(training=TrainingSettings(lr=0.05, batch_size=32), strategy="fedavg",
            strategy_options={}, clients_per_round=2, seed=7)


def settings(*argv: str) -> CoordinatorSettings:
    return settings_from_args(build_parser().parse_args(["--run-id", "t", *argv]))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "slots.toml"
    path.write_text(text)
    return path


def test_sweep_grid_has_one_slot_per_point_first_key_slowest() -> None:
    """Two keys make their product, values parsed as numbers where they are numbers."""
    points = parse_sweep(["lr=0.01,0.1", "strategy=fedavg,fedadam"])
    assert points == [{"lr": 0.01, "strategy": "fedavg"}, {"lr": 0.01, "strategy": "fedadam"},
                      {"lr": 0.1, "strategy": "fedavg"}, {"lr": 0.1, "strategy": "fedadam"}]


def test_sweep_larger_than_the_maximum_is_refused_naming_the_keys() -> None:
    """A grid over MAX_SLOTS points is an error that says which keys made it."""
    values = ",".join(str(i + 1) for i in range(MAX_SLOTS + 1))
    with pytest.raises(ConfigError, match=rf"batch_size \({MAX_SLOTS + 1}\).*maximum"):
        parse_sweep([f"batch_size={values}"])


def test_a_key_a_slot_leaves_out_takes_the_command_line_value(tmp_path: Path) -> None:
    """Slot tables override only what they name; strategy options unfold to strategy.X."""
    path = write(tmp_path, '[[slot]]\nlr = 0.1\n\n[[slot]]\nstrategy = "fedadam"\n'
                           "strategy_options = {eta = 0.02}\nbatch_size = 64\n")
    overrides, bounds = read_file(path)
    first, second = (resolve(BASE, i, o) for i, o in enumerate(overrides))
    assert (first.training.lr, first.training.batch_size, first.strategy) == (0.1, 32, "fedavg")
    assert (second.training.lr, second.training.batch_size) == (0.05, 64)
    assert (second.strategy, second.strategy_options) == ("fedadam", {"eta": 0.02})
    assert (first.seed, second.seed, second.clients_per_round) == (7, 8, 2)
    assert bounds == {}


@pytest.mark.parametrize(("table", "message"), [
    ("lrr = 0.1", r"slot 1: unknown key 'lrr'"),
    ("lr = -0.1", r"slot 1: lr must be > 0"),
    ('lr = "fast"', r"slot 1: lr must be a number"),
    ("batch_size = 1.5", r"slot 1: batch_size must be an integer"),
    ("momentum = 1.0", r"slot 1: momentum must be \[0, 1\)"),
    ('strategy = "nope"', r"slot 1: strategy: unknown strategy 'nope'"),
    ('strategy = "fedadam"\nstrategy_options = {etaa = 1}', r"slot 1: strategy: .*bad options"),
])
def test_a_bad_slot_table_names_the_slot_and_the_key(tmp_path: Path, table: str,
                                                     message: str) -> None:
    """Unknown keys and bad values are errors naming the slot and the key."""
    path = write(tmp_path, f"[[slot]]\nlr = 0.1\n\n[[slot]]\n{table}\n")
    with pytest.raises(ConfigError, match=message):
        slot_overrides(path, [], BASE)


def test_bounds_are_read_and_checked(tmp_path: Path) -> None:
    """[bounds] gives PBT's explore range; a key that cannot be explored is refused."""
    path = write(tmp_path, "[[slot]]\n[[slot]]\n[bounds]\nlr = [0.001, 0.3]\n")
    assert slot_overrides(path, [], BASE)[1] == {"lr": (0.001, 0.3)}
    bad = write(tmp_path, "[[slot]]\n[bounds]\nseed = [0, 3]\n")
    with pytest.raises(ConfigError, match="bounds: 'seed' cannot be explored"):
        slot_overrides(bad, [], BASE)


def test_command_line_sweep_sets_the_slot_count_and_keeps_it_through_resume() -> None:
    """--sweep makes the slots; the settings saved for --resume rebuild the same configs."""
    s = settings("--sweep", "lr=0.01,0.03,0.1", "--lr", "0.05")
    assert s.slots == 3
    saved = CoordinatorSettings.from_json(s.to_json())
    assert [c.training.lr for c in run_configs(saved).values()] == [0.01, 0.03, 0.1]
    resumed = run_configs(saved, {"1": {**run_configs(saved)[1].flat(), "lr": 0.04}})
    assert resumed[1].training.lr == 0.04  # what PBT left is what a resumed run uses
    assert json.loads(s.to_json())["slot_overrides"][2] == {"lr": 0.1}


@pytest.mark.parametrize(("argv", "message"), [
    (["--slots", "2", "--sweep", "lr=0.1,0.2,0.3"], "--slots 2 but"),
    (["--merge", "every=2"], "--merge needs --shared-init"),
    (["--merge", "sometimes", "--shared-init"], "--merge 'sometimes'"),
    (["--sweep", "lrr=0.1,0.2"], "slot 0: unknown key 'lrr'"),
    (["--slots", "1", "--population", "pbt"], "pbt needs at least 2 slots"),
])
def test_command_line_errors_stop_before_anything_starts(argv: list[str], message: str) -> None:
    """Inconsistent options exit with a message, before any Redis or agent is started."""
    with pytest.raises(SystemExit, match=message):
        settings(*argv)


def test_status_shows_each_slot_configuration() -> None:
    """/status carries each slot's current configuration (PBT changes it as it goes)."""
    from coordinator.status import SlotStatus

    config = resolve(BASE, 1, {"lr": 0.1}).flat()
    assert SlotStatus(1, 5, config=config).as_dict()["config"] == config


@pytest.mark.parametrize("extra", [["--sweep", "lr=0.1,0.2"], ["--population", "pbt"],
                                   ["--merge", "every=2", "--shared-init"]])
def test_gradient_slots_refuse_slot_cooperation(extra: list[str]) -> None:
    """Sweeps, PBT and merges are for weight slots: with gradient slots they are refused."""
    with pytest.raises(SystemExit, match="weight slots only"):
        settings("--mode", "gradient", *extra)
