"""Run files: --config run.toml takes every option, the command line overrides it, and
every run writes a resolved run.toml that reruns it with the same settings."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator import runfile
from coordinator.cli import build_parser, settings_from_args
from coordinator.settings import CoordinatorSettings
from tests.e2e import Run

SWEEP_FILE = """\
task = "synthetic"
rounds = 3
local-agents = 2
no_local_handoff = true
task_option = {examples_per_client = 16, features = 8}
sweep = ["lr=0.01,0.05"]
"""


def _parse(tmp_path: Path, text: str, *argv: str) -> tuple[object, CoordinatorSettings]:
    path = tmp_path / "run.toml"
    path.write_text(text)
    parser = build_parser()
    args = runfile.parse_args(parser, ["--config", str(path), "--run-id", "r", *argv])
    return args, settings_from_args(args)


def test_every_key_of_the_file_is_an_option(tmp_path: Path) -> None:
    """Keys are long option names (- or _), flags are booleans, KEY=VALUE options tables."""
    _, s = _parse(tmp_path, SWEEP_FILE)
    assert (s.task, s.rounds, s.local_agents, s.local_handoff) == (
        "trainer_worker.tasks.synthetic:SyntheticTask", 3, 2, False)
    # val_fraction: the default --val-fraction, added for a task that takes it
    assert s.task_options == {"examples_per_client": 16, "features": 8, "val_fraction": 0.1}
    assert s.slots == 2
    assert [o["lr"] for o in s.slot_overrides] == [0.01, 0.05]


def test_the_command_line_overrides_the_file(tmp_path: Path) -> None:
    """A command-line option wins; KEY=VALUE options merge key by key; --sweep replaces the
    file's slots."""
    _, s = _parse(tmp_path, SWEEP_FILE, "--rounds", "5", "--task-option", "features=4",
                  "--sweep", "momentum=0.0,0.5,0.9")
    assert s.rounds == 5
    assert s.task_options == {"examples_per_client": 16, "features": 4, "val_fraction": 0.1}
    assert [o["momentum"] for o in s.slot_overrides] == [0.0, 0.5, 0.9]
    assert all("lr" not in o for o in s.slot_overrides)


def test_slot_tables_are_read_as_slot_config_reads_them(tmp_path: Path) -> None:
    """[[slot]] and [bounds] tables in the run file are --slot-config's."""
    text = ('population = "pbt"\n[bounds]\nlr = [0.001, 0.5]\n[[slot]]\nlr = 0.1\n'
            '[[slot]]\nstrategy = "fedadam"\nstrategy_options = {eta = 0.02}\n')
    _, s = _parse(tmp_path, text)
    assert s.slot_overrides == ({"lr": 0.1}, {"strategy": "fedadam", "strategy.eta": 0.02})
    assert s.explore_bounds == {"lr": [0.001, 0.5]}


@pytest.mark.parametrize(("text", "message"), [
    ("local_agnets = 2\n", "unknown key 'local_agnets'; did you mean 'local_agents'?"),
    ("rounds = 0\n", "rounds: must be > 0"),
    ("policy = \"fastest\"\n", "policy: 'fastest' is not one of"),
    ("no_progress = 1\n", "no_progress: must be true or false"),
    ("[[slot]]\nlrr = 0.1\n", "slot 0: unknown key 'lrr'"),
])
def test_a_bad_key_or_value_is_a_clear_error(tmp_path: Path, text: str, message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown key names the closest valid one; a bad value names its key."""
    with pytest.raises(SystemExit):
        _parse(tmp_path, text)
    assert message in capsys.readouterr().err + _exit_text(tmp_path, text)


def _exit_text(tmp_path: Path, text: str) -> str:
    try:
        _parse(tmp_path, text)
    except SystemExit as exc:
        return str(exc.code)
    return ""


def test_the_resolved_file_reads_back_to_itself_and_the_same_settings(tmp_path: Path) -> None:
    """run.toml holds every resolved option and the slots as tables: read back, it gives the
    same settings and writes the same file."""
    parser = build_parser()
    args, settings = _parse(tmp_path, SWEEP_FILE, "--local-steps", "7")
    first = runfile.dumps(runfile.resolved(args, settings, parser))  # type: ignore[arg-type]
    again_args, again = _parse(tmp_path, first)
    second = runfile.dumps(runfile.resolved(again_args, again, build_parser()))  # type: ignore[arg-type]
    assert first == second
    assert json.loads(again.to_json()) == json.loads(settings.to_json())
    assert "[[slot]]\nlr = 0.01" in first
    assert "sweep" not in first


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_a_run_reproduced_from_its_run_toml_has_the_same_settings(
        launch: Callable[..., Run], tmp_path: Path) -> None:
    """python -m coordinator --config runs/ID/run.toml: the same run.toml and settings."""
    (tmp_path / "a.toml").write_text(SWEEP_FILE.replace("rounds = 3", "rounds = 1")
                                       .replace("local-agents = 2", "local-agents = 1"))
    first = launch("first", "--config", str(tmp_path / "a.toml"), "--local-steps", "3")
    assert first.wait(150) == 0, first.output()[-2000:]
    toml = tmp_path / "first" / "run.toml"
    second = launch("second", "--config", str(toml))
    assert second.wait(150) == 0, second.output()[-2000:]
    assert (tmp_path / "second" / "run.toml").read_text() == toml.read_text()
    settings = [json.loads((tmp_path / r / "state.json").read_text())["settings"]
                for r in ("first", "second")]
    assert {k for k in settings[0] if settings[0][k] != settings[1][k]} == {"run_id"}


def test_val_fraction_goes_to_tasks_that_take_it_and_is_refused_elsewhere(
        tmp_path: Path) -> None:
    """--val-fraction becomes the task option val_fraction for a task whose factory names it
    (its own value wins over the default); for one that does not, an explicit value is a
    clear error and the default adds nothing; a value outside [0, 1) is refused."""
    _, s = _parse(tmp_path, SWEEP_FILE, "--val-fraction", "0.25")
    assert s.task_options["val_fraction"] == 0.25
    _, s = _parse(tmp_path, SWEEP_FILE, "--task", "tests.e2e_tasks:SlowEvalTask")
    assert "val_fraction" not in s.task_options
    with pytest.raises(SystemExit, match="takes no val_fraction"):
        _parse(tmp_path, SWEEP_FILE, "--task", "tests.e2e_tasks:SlowEvalTask",
               "--val-fraction", "0.2")
    with pytest.raises(SystemExit, match=r"\[0, 1\)"):
        _parse(tmp_path, SWEEP_FILE, "--val-fraction", "1.5")
