"""PWFL from Python: pwfl.run takes the command line's options, pwfl.load reads a finished
run back, and the example notebook runs a sweep end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from coordinator import api as pwfl
from coordinator import runfile
from coordinator.cli import build_parser, settings_from_args
from tests.e2e import ROOT


def test_keywords_are_run_file_keys_over_the_config_file(tmp_path: Path) -> None:
    """Keywords override the run file; a sweep dict becomes the --sweep grid and replaces
    the file's slots; Paths become strings."""
    (tmp_path / "run.toml").write_text('rounds = 3\ntask = "synthetic"\n[[slot]]\nlr = 0.1\n')
    document = pwfl.request(tmp_path / "run.toml", {"rounds": 5, "local-agents": 2,
                                                    "sweep": {"lr": [0.01, 0.1]},
                                                    "runs_dir": tmp_path})
    assert document == {"rounds": 5, "task": "synthetic", "local_agents": 2,
                        "sweep": ["lr=0.01,0.1"], "runs_dir": str(tmp_path)}
    tables = pwfl.request(tmp_path / "run.toml", {"slot": [{"lr": 0.2}]})
    assert tables["slot"] == [{"lr": 0.2}]


def test_an_unknown_keyword_names_the_closest_option() -> None:
    """pwfl.run(local_agnets=2) fails before anything starts, naming local_agents."""
    with pytest.raises(ValueError, match="unknown key 'local_agnets'; did you mean 'local_agents'"):
        pwfl.run(local_agnets=2)


def test_without_pandas_the_tables_are_lists_of_dicts(monkeypatch: pytest.MonkeyPatch) -> None:
    """pandas is optional: without it a table is the same rows as plain dicts."""
    from coordinator import run_result

    monkeypatch.setitem(sys.modules, "pandas", None)
    assert run_result.frame([{"a": 1}]) == [{"a": 1}]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_returns_the_slots_models_and_tables_and_load_reads_them_back(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep started from Python: one slot per point, their final models and accuracies,
    the replay's tables; load(run_dir) gives the same; the run.toml is the command line's."""
    pytest.importorskip("pandas")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    options = {"task": "synthetic", "clients": 4, "local_agents": 1, "rounds": 2,
               "local_steps": 3, "sweep": {"lr": [0.01, 0.1]}, "http_port": 0,
               "redis": redis_url, "runs_dir": str(tmp_path), "run_id": "api"}
    result = pwfl.run(progress=False, **options)
    assert (result.status, [s.label for s in result.slots]) == ("finished",
                                                                ["lr=0.01", "lr=0.1"])
    assert all(0 <= (s.accuracy or -1) <= 1 for s in result.slots)
    assert set(result.models) == {0, 1}
    assert len(result.rounds) == 4
    assert set(result.leases["slot_id"]) == {"0", "1"}
    assert pwfl.load(result.run_dir).accuracies == result.accuracies
    argv = ["--task", "synthetic", "--clients", "4", "--local-agents", "1", "--rounds", "2",
            "--local-steps", "3", "--sweep", "lr=0.01,0.1", "--http-port", "0", "--redis",
            redis_url, "--runs-dir", str(tmp_path), "--run-id", "cli"]
    parser = build_parser()
    args = runfile.parse_args(parser, argv)
    cli = runfile.dumps(runfile.resolved(args, settings_from_args(args), parser))
    assert (result.run_dir / "run.toml").read_text() == cli


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_example_notebook_runs_a_sweep_and_plots_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/sweep.ipynb, executed: no error, three slots, the comparison plot drawn."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("pandas")  # the notebook indexes the tables by column
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(ROOT / "examples" / "sweep.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(notebook, tmp_path / "sweep.executed.ipynb")
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert len(list((tmp_path / "runs").glob("*/checkpoints/slot2"))) == 1


def test_progress_line_counts_rounds_aggregated_and_labels_both_accuracies() -> None:
    """The one-line progress of pwfl.run: rounds when aggregated, the latest validation and
    test accuracy each under its name; round_closed (which lags) moves nothing."""
    shown = pwfl._Progress("r")
    shown.handle = None
    events = [{"event": "run_started", "rounds": 4},
              {"event": "aggregation_finished", "slot_id": 0, "round": 1},
              {"event": "validation_finished", "slot_id": 0, "round": 0, "accuracy": 0.5},
              {"event": "aggregation_finished", "slot_id": 0, "round": 2},
              {"event": "evaluation_finished", "slot_id": 0, "round": 1, "accuracy": 0.625},
              {"event": "round_closed", "slot_id": 0, "round": 1, "accuracy": 0.625},
              {"event": "aggregation_finished", "slot_id": 1, "round": 1}]
    shown._show = lambda: None  # type: ignore[method-assign]
    shown.update(events)
    assert shown.text() == ("PWFL run r [running] slot 0: 2/4 val 50.0% test 62.5%  "
                            "slot 1: 1/4 val - test -")
    assert {"aggregation_finished", "validation_finished", "evaluation_finished"} <= set(
        pwfl.SHOWN_EVENTS)
