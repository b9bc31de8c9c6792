"""How long an agent lets one training call run (`client_agent.limits`)."""

from __future__ import annotations

from client_agent.cli import build_parser, settings_from_args
from client_agent.limits import MIN_AUTO_LIMIT_S, gradient_call_limit_s, train_time_limit_s
from serialization import GradientJob, Job


def _job(published_ts: float, deadline_ts: float) -> Job:
    return Job(job_id="j", run_id="r", slot_id=0, round=1, client_id="0", model_digest="d",
               model_nbytes=1, deadline_ts=deadline_ts, task="t", published_ts=published_ts)


def test_a_fixed_limit_wins_over_the_deadline() -> None:
    """--train-timeout-s bounds every call, whatever the job's deadline."""
    assert train_time_limit_s(_job(0.0, 10_000.0), 3.0, now_ts=1.0) == 3.0


def test_the_default_is_the_time_to_the_deadline_plus_one_more_round() -> None:
    """Without a setting: time left to the deadline plus the round's length (late updates
    can still be folded into the next round)."""
    job = _job(published_ts=1000.0, deadline_ts=1600.0)
    assert train_time_limit_s(job, None, now_ts=1100.0) == 500.0 + 600.0


def test_the_default_never_goes_below_its_floor() -> None:
    """Short deadlines, or a job started past its deadline, still get the floor."""
    assert train_time_limit_s(_job(1000.0, 1002.0), None, now_ts=1010.0) == MIN_AUTO_LIMIT_S
    assert train_time_limit_s(_job(0.0, 5.0), None, now_ts=4.0) == MIN_AUTO_LIMIT_S


def test_the_option_reaches_the_settings() -> None:
    """--train-timeout-s is parsed into the agent's settings; absent, it is None (derived)."""
    parser = build_parser()
    given = parser.parse_args(["--redis", "redis://x", "--clients", "0",
                               "--train-timeout-s", "2.5"])
    assert settings_from_args(given, environ={}).train_timeout_s == 2.5
    default = parser.parse_args(["--redis", "redis://x", "--clients", "0"])
    assert settings_from_args(default, environ={}).train_timeout_s is None


def _session(step_deadline_s: float) -> GradientJob:
    return GradientJob(job_id="j", run_id="r", slot_id=0, round=1, client_id="0", session="s",
                       steps=5, step_deadline_s=step_deadline_s, deadline_ts=1e9, task="t")


def test_a_gradient_call_is_bounded_by_the_step_deadline_with_the_same_floor() -> None:
    """A gradient session's trainer calls get its step deadline, at least the floor; the
    option, when given, wins."""
    assert gradient_call_limit_s(_session(300.0), None) == 300.0
    assert gradient_call_limit_s(_session(4.0), None) == MIN_AUTO_LIMIT_S
    assert gradient_call_limit_s(_session(300.0), 3.0) == 3.0
