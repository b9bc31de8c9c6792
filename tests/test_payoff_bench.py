"""bench.payoff's reading of runs: targets, equal wall time, mean and spread, the verdict."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench.payoff import (
    RunResult,
    _parser,
    _runs_missing,
    accuracy_at,
    jobs_to_target,
    main,
    mode_args,
    render,
    result_of,
    table,
    time_to,
    verdict,
)
from tests.fixtures.replay.synth import event_line, write_jsonl


def result(mode: str, seed: int, curve: list[tuple[float, float]]) -> RunResult:
    times = {f"{t:g}": time_to(curve, t) for t in (0.80, 0.85)}
    return RunResult(mode=mode, seed=seed, wall_s=curve[-1][0], time_to=times,
                     jobs_to={k: None if v is None else int(v) for k, v in times.items()},
                     curve=curve, final_best=curve[-1][1], client_busy=0.5,
                     coordinator_busy=0.5, jobs=60)


def test_targets_and_accuracy_at_a_time_read_the_best_so_far_curve() -> None:
    """The first time the curve reaches a target; the last point at or before a time."""
    curve = [(10.0, 0.7), (20.0, 0.82), (30.0, 0.86)]
    assert (time_to(curve, 0.80), time_to(curve, 0.85), time_to(curve, 0.9)) == (20.0, 30.0, None)
    assert (accuracy_at(curve, 25.0), accuracy_at(curve, 5.0)) == (0.82, None)


def test_verdict_compares_the_best_multi_slot_mode_with_one_slot() -> None:
    """Time to 85% as a ratio of one slot's, accuracy gain at the seed's shortest wall time."""
    results = [result("one", s, [(10.0, 0.8), (40.0, 0.85), (50.0, 0.86)]) for s in (0, 1)]
    results += [result("merged", s, [(10.0, 0.84), (20.0, 0.87), (45.0, 0.88)]) for s in (0, 1)]
    results += [result("independent", s, [(10.0, 0.7), (30.0, 0.75)]) for s in (0, 1)]
    rows = table(results)
    assert rows["merged"]["time_to_0.85"] == {"mean": 20.0, "spread": 0.0, "missing": 0}
    assert rows["independent"]["time_to_0.85"]["missing"] == 2
    found = verdict(rows)
    assert found["best_mode"] == "merged"
    assert found["best_time_to_85_vs_one_slot"] == pytest.approx(0.5)
    assert found["best_accuracy_gain_points"] == pytest.approx((0.87 - 0.8) * 100)  # at t=30
    assert found["goal_met"] is True
    assert "never" in render(rows)


def _run_log(path: Path, *, validation: bool) -> Path:
    """One slot, four rounds of 6 s with two clients each (answered 4 s into the round);
    round r's clients validate model r - 1 half a second after answering; the coordinator's
    test-set evaluation of model r comes 1 s after the round's aggregate."""
    val = {0: 0.5, 1: 0.7, 2: 0.82, 3: 0.9}
    test = {1: 0.6, 2: 0.81, 3: 0.86, 4: 0.9}
    lines = [event_line(0.0, "run_started", slots=1, rounds=4)]
    for r in (1, 2, 3, 4):
        t, ids = 1.0 + 6 * (r - 1), dict[str, Any](slot_id=0, round=r)
        lines.append(event_line(t, "round_started", clients=["x", "y"], **ids))
        for client in ("x", "y"):
            lines += [event_line(t, "job_published", client_id=client, job_id=f"{client}{r}",
                                 **ids),
                      event_line(t + 4, "update_received", client_id=client, status="ok",
                                 job_id=f"{client}{r}", timings={"train_s": 3.0}, **ids)]
        if validation:
            lines.append(event_line(t + 4.5, "validation_finished", slot_id=0, round=r - 1,
                                    during_round=r, accuracy=val[r - 1], loss=1.0,
                                    num_examples=200, clients=2))
        lines += [event_line(t + 5, "quorum_reached", reason="all", wait_s=5.0, **ids),
                  event_line(t + 5.5, "aggregation_finished", num_updates=2, duration_s=0.5,
                             **ids),
                  event_line(t + 6.5, "evaluation_finished", accuracy=test[r], duration_s=1.0,
                             **ids)]
    lines.append(event_line(26.0, "run_finished", status="finished"))
    path.mkdir(parents=True)
    return write_jsonl(sorted(lines, key=lambda line: line["ts"]), path / "events.jsonl")


def test_jobs_to_target_by_test_and_by_validation(tmp_path: Path) -> None:
    """Updates aggregated to make the first model that reached each target, by the test set
    and by the clients' validation splits: counted to that model's own aggregation, not to
    when its figure was logged (the validation of model r is logged a round later, the test
    set's a second later: neither adds jobs); a run that logged no validation reads n/a."""
    new = result_of("one", 0, _run_log(tmp_path / "new", validation=True))
    assert new.time_to == {"0.8": 12.5, "0.85": 18.5, "0.88": 24.5}
    assert new.jobs_to == {"0.8": 4, "0.85": 6, "0.88": 8}
    assert new.jobs_to_val == {"0.8": 4, "0.85": 6, "0.88": 6}  # model 3 validated at 0.9
    old = result_of("one", 1, _run_log(tmp_path / "old", validation=False))
    assert (old.jobs_to, old.jobs_to_val) == (new.jobs_to, None)
    rows = table([new, old, replace(old, mode="merged")])
    assert rows["one"]["jobs_to_0.8_val"] == {"mean": 4.0, "spread": 0.0, "missing": 0}
    assert rows["one"]["jobs_to_0.8_test"]["mean"] == 4.0
    assert rows["merged"]["jobs_to_0.8_val"]["n/a"] is True
    text = render(rows)
    assert "jobs to 0.8 (test) | jobs to 0.85 (test)" in text
    assert "jobs to 0.8 (val)" in text
    merged = next(line for line in text.splitlines() if line.startswith("merged |"))
    assert "n/a" in merged
    assert jobs_to_target(rows)["one"]["0.85"] == {"test": 6.0, "val": 6.0}
    assert jobs_to_target(rows)["merged"]["0.85"]["val"] == "n/a"
    assert "aggregated" in _parser().format_help()  # --help says which jobs are counted


def test_merged_async_is_merged_with_a_quorum_and_late_folds() -> None:
    args = mode_args("merged-async", 0.05, 2, 2)
    assert args[:args.index("--quorum")] == mode_args("merged", 0.05, 2, 2)
    assert args[args.index("--quorum"):] == ["--quorum", "0.5", "--late-policy", "fold",
                                             "--staleness", "inverse"]


def test_an_unknown_mode_is_refused_before_anything_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--modes", "one,merged-sync", "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    assert "unknown mode(s) merged-sync" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_reuse_runs_only_when_a_planned_log_is_missing(tmp_path: Path) -> None:
    """With --reuse a new mode next to finished runs still needs its runs (and, on the
    testbed, its silos); a profile whose every run is logged needs none."""
    args = _parser().parse_args(["--modes", "one,merged", "--seeds", "0", "--reuse"])
    args.out = tmp_path
    for mode in ("one", "merged"):
        (tmp_path / f"{mode}-seed0").mkdir()
        (tmp_path / f"{mode}-seed0" / "events.jsonl").write_text("")
    assert not _runs_missing(args)
    args.modes = "one,merged,merged-async"
    assert _runs_missing(args)
    args.reuse = False
    args.modes = "one"
    assert _runs_missing(args)
