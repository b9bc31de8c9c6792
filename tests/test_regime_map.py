"""bench.regime_map's reading of the testbed benchmarks, and bench.testbed.silos' reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.payoff import RunResult, table, time_to, verdict
from bench.regime_map import figure, main, regime
from bench.regime_map import table as map_table
from bench.testbed.silos import emulation_report, link_bytes


def result(mode: str, seed: int, curve: list[tuple[float, float]], busy: float = 0.5,
           jobs_per_min: float = 10.0) -> RunResult:
    times = {f"{t:g}": time_to(curve, t) for t in (0.80, 0.85)}
    return RunResult(mode=mode, seed=seed, wall_s=curve[-1][0], time_to=times,
                     jobs_to={k: None for k in times}, curve=curve, final_best=curve[-1][1],
                     client_busy=busy, coordinator_busy=0.5, jobs=60,
                     jobs_per_min=jobs_per_min)


def write_payoff(path: Path, results: list[RunResult]) -> None:
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"rows": table(results), "runs": []}))


def test_the_verdict_takes_the_better_of_the_two_one_slot_baselines() -> None:
    """3 slots are judged against the faster baseline (here the asynchronous one), and the
    idle the slots recovered is a share of that baseline's idle fraction."""
    rows = table([result("one", 0, [(10.0, 0.8), (60.0, 0.85)], busy=0.5),
                  result("one-async", 0, [(10.0, 0.8), (40.0, 0.85)], busy=0.6),
                  result("merged", 0, [(10.0, 0.8), (20.0, 0.85)], busy=0.8)])
    found = verdict(rows)
    assert (found["best_mode"], found["baseline"]) == ("merged", "one-async")
    assert found["best_time_to_85_vs_one_slot"] == pytest.approx(0.5)
    assert found["best_recovered_idle"] == pytest.approx((0.4 - 0.2) / 0.4)


def test_regime_reads_payoff_resnet_and_flower_results(tmp_path: Path) -> None:
    """Per profile: 3-slot over 1-slot time to 85%, inverted throughput ratio for the
    ResNet-18-sized runs, and PWFL's best over Flower deployment's time to 85%."""
    write_payoff(tmp_path / "payoff-wan", [result("one", 0, [(10.0, 0.85)]),
                                           result("pbt", 0, [(5.0, 0.85)])])
    write_payoff(tmp_path / "payoff-wan-resnet18", [
        result("one", 0, [(1.0, 0.1)], jobs_per_min=10.0),
        result("independent", 0, [(1.0, 0.1)], jobs_per_min=20.0)])
    (tmp_path / "vs-flower-wan.log").write_text("table\n" + json.dumps(
        {"flower-deployment:flower-default-like:time_to_85_s": 50.0,
         "pwfl:pwfl-default-job:time_to_85_s": 8.0}) + "\n")
    wan = regime(tmp_path, "wan")
    assert (wan.slots_vs_one, wan.best_slots, wan.best_one) == (0.5, "pbt", "one")
    assert wan.resnet_slots_vs_one == pytest.approx(0.5)
    assert wan.pwfl_vs_flower == pytest.approx(5.0 / 50.0)
    empty = regime(tmp_path, "lan")
    assert (empty.slots_vs_one, empty.pwfl_vs_flower) == (None, None)
    text = map_table([wan, empty])
    assert "| wan | 0.50 | pbt vs one | 0.50 | 0.10 |" in text
    assert "EMULATED" in text
    assert figure([wan, empty], "test").startswith(b"\x89PNG")


def test_slots_that_never_reach_the_target_read_never_and_a_lower_target_gives_a_ratio(
        tmp_path: Path) -> None:
    """3-slot runs that miss 85% on a seed are "never" (measured), not a gap; at --target
    0.8 the same runs give a ratio, Flower's 80% time included; OUT.md and OUT.png keep a
    dotted name whole."""
    write_payoff(tmp_path / "payoff-hetero", [
        result("one", 0, [(20.0, 0.8), (60.0, 0.85)]), result("one", 1, [(30.0, 0.85)]),
        result("merged", 0, [(10.0, 0.8), (40.0, 0.85)]), result("merged", 1, [(20.0, 0.8)])])
    (tmp_path / "vs-flower-hetero.log").write_text(json.dumps(
        {"flower-deployment:flower-default-like:time_to_80_s": 100.0,
         "pwfl:pwfl-default-job:time_to_80_s": 12.0}) + "\n")
    at_85 = regime(tmp_path, "hetero")
    assert (at_85.slots_vs_one, at_85.never, at_85.pwfl_vs_flower) == (None, "3 slots", None)
    assert "| hetero | 3 slots never | - vs one |" in map_table([at_85])
    assert regime(tmp_path, "lan").never == ""  # nothing measured: a gap, not "never"
    at_80 = regime(tmp_path, "hetero", "0.8")
    assert at_80.slots_vs_one == pytest.approx(15.0 / 25.0)
    assert at_80.pwfl_vs_flower == pytest.approx(12.0 / 100.0)
    assert "time to 80%" in map_table([at_80])
    out = tmp_path / "maps" / "map-0.8"
    assert main(["--runs", str(tmp_path), "--profiles", "hetero,lan", "--target", "0.8",
                 "--out", str(out)]) == 0
    assert (tmp_path / "maps" / "map-0.8.png").read_bytes().startswith(b"\x89PNG")
    assert "| hetero | 0.60 | merged vs one |" in (tmp_path / "maps" / "map-0.8.md").read_text()


def test_never_names_the_side_that_missed_the_target(tmp_path: Path) -> None:
    """A baseline that misses the target is named as such (it was "not measured" when only
    the slots' misses counted), and so is a regime where both sides missed it."""
    write_payoff(tmp_path / "payoff-wan", [
        result("one", 0, [(20.0, 0.8)]), result("merged", 0, [(10.0, 0.85)])])
    write_payoff(tmp_path / "payoff-hetero", [
        result("one", 0, [(20.0, 0.8)]), result("merged", 0, [(10.0, 0.8)])])
    wan, hetero = regime(tmp_path, "wan"), regime(tmp_path, "hetero")
    assert (wan.never, hetero.never) == ("1 slot", "both")
    text = map_table([wan, hetero])
    assert "| wan | 1 slot never | merged vs - |" in text
    assert "| hetero | both never | - vs - |" in text
    assert regime(tmp_path, "hetero", "0.8").never == ""  # at 80% both got there


def test_emulation_report_counts_overruns_and_first_calls(tmp_path: Path) -> None:
    """The silos' device_emulated events add up: calls, overruns, first-call overruns."""
    events = [{"event": "device_emulated", "overran": True, "call": 1, "compute_s": 2.0,
               "padded_s": 0.0},
              {"event": "device_emulated", "overran": False, "call": 2, "compute_s": 0.5,
               "padded_s": 1.5},
              {"event": "job_done"}]
    (tmp_path / "silo-0.jsonl").write_text("\n".join(json.dumps(e) for e in events))
    report = emulation_report(tmp_path)
    assert (report.calls, report.overran, report.overran_first) == (2, 1, 1)
    assert (report.compute_s, report.padded_s) == (2.5, 1.5)
    assert "EMULATION" in report.line()


def test_link_bytes_sum_the_silos_deltas() -> None:
    """Bytes and drops over all links between two counter readings."""
    before = [{"download_bytes": 10, "upload_bytes": 1, "download_drops": 0, "upload_drops": 0}]
    after = [{"download_bytes": 110, "upload_bytes": 21, "download_drops": 2, "upload_drops": 0}]
    assert link_bytes(before, after) == {"download_bytes": 100, "upload_bytes": 20,
                                         "download_drops": 2, "upload_drops": 0}
