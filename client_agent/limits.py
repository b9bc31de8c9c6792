"""How long one training call may take before its trainer counts as hung.

A stuck training call (user code waiting forever, a deadlocked data loader) holds
its trainer, and with it every other client of the agent that waits for that
trainer; its client's lease is never returned either. So every call gets a bound:
`--train-timeout-s` when the operator knows how long training takes, otherwise
one derived from the job's deadline (`train_time_limit_s`).

A gradient session's calls (open, each step, close) are bounded too
(`gradient_call_limit_s`): by `--train-timeout-s` when given, else by the
session's step deadline (`GradientJob.step_deadline_s`, which the coordinator
sets above its own wait for a step; a client that misses that wait is dropped
from the session but may still answer), with the same floor.

The derived bound is the time left until the job's round deadline plus one more
round deadline (the round's length, `deadline_ts - published_ts`), and at least
`MIN_AUTO_LIMIT_S`. A call past its own deadline is not yet hung: its update can
still be folded late into the slot's next round (`--late-policy fold`), so it gets
one more round's time; a call still running after that is taken for hung. The
floor keeps short test deadlines from killing ordinary stragglers.
"""

from __future__ import annotations

from serialization import AnyJob, GradientJob

MIN_AUTO_LIMIT_S = 60.0


def train_time_limit_s(job: AnyJob, fixed_s: float | None, now_ts: float) -> float:
    """Seconds a training call for `job` starting at `now_ts` may take (see the module)."""
    if fixed_s is not None:
        return fixed_s
    round_s = job.deadline_ts - job.published_ts if job.published_ts else 0.0
    return max(MIN_AUTO_LIMIT_S, job.deadline_ts - now_ts + max(round_s, 0.0))


def gradient_call_limit_s(job: GradientJob, fixed_s: float | None) -> float:
    """Seconds one trainer call of `job`'s gradient session may take (see the module)."""
    return fixed_s if fixed_s is not None else max(MIN_AUTO_LIMIT_S, job.step_deadline_s)
