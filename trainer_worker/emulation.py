"""Emulated devices: every training call padded with sleep to a nominal device time.

The testbed (`bench/testbed`) emulates silos whose devices differ in speed on one
machine without burning its cores: a device has a nominal time per training step
(`step_s`, set above what a step needs on the shared cores) and a slowdown `k`
(speed 1/k), so a job of S steps takes `S * step_s * k` however fast the real
compute was. When the real compute took longer than that, the emulation failed
for that call: the `device_emulated` event says so (`overran`), and every report
built on the testbed counts those calls.

The setting travels in the environment (`PWFL_EMULATED_DEVICE=step_s=0.05,slowdown=4`)
and is read once, at the trainer process's entry point; `python -m client_agent
--emulate-device` sets it for the agent's trainers. This is an emulation for
benchmarks, never a production setting.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from trainer_worker.task import TrainConfig

log = structlog.get_logger()

ENV = "PWFL_EMULATED_DEVICE"
# Training calls padded in this process: the first one of a trainer also loads its data,
# which a report may want to tell apart from the steady state.
_CALLS = itertools.count(1)


class EmulationError(ValueError):
    """An emulated-device setting that cannot be parsed."""


@dataclass(frozen=True)
class EmulatedDevice:
    """A device whose training step takes `step_s * slowdown` seconds (nominal)."""

    step_s: float  # nominal seconds per training step at speed 1
    slowdown: float = 1.0  # k: this device runs at speed 1/k

    def __post_init__(self) -> None:
        if not (self.step_s > 0 and self.slowdown >= 1):
            raise EmulationError(f"step_s must be > 0 and slowdown >= 1, not {self}")

    @classmethod
    def parse(cls, text: str) -> EmulatedDevice:
        """'step_s=0.05,slowdown=4' (slowdown defaults to 1)."""
        try:
            pairs = dict(item.strip().split("=", 1) for item in text.split(",") if item.strip())
            if set(pairs) - {"step_s", "slowdown"}:
                raise ValueError(f"unknown keys {sorted(set(pairs) - {'step_s', 'slowdown'})}")
            return cls(step_s=float(pairs["step_s"]), slowdown=float(pairs.get("slowdown", 1)))
        except (KeyError, ValueError) as exc:
            raise EmulationError(f"want step_s=SECONDS[,slowdown=K], not {text!r}: {exc}") from exc

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> EmulatedDevice | None:
        text = environ.get(ENV, "").strip()
        return cls.parse(text) if text else None

    def to_text(self) -> str:
        return f"step_s={self.step_s:g},slowdown={self.slowdown:g}"

    def nominal_s(self, steps: int) -> float:
        return steps * self.step_s * self.slowdown


def job_steps(config: TrainConfig, num_examples: int) -> int:
    """The steps a job takes: its step budget, else its cap, else whole epochs of its data."""
    if config.local_steps > 0:
        return config.local_steps
    epoch_steps = math.ceil(max(num_examples, 1) / max(config.batch_size, 1)) * config.epochs
    if config.max_steps > 0:
        return config.max_steps if config.noop else min(config.max_steps, epoch_steps)
    return epoch_steps


def pad(device: EmulatedDevice | None, started: float, ended: float, config: TrainConfig,
        num_examples: int) -> float:
    """Sleep until the job's nominal time since `started` has passed; when the job ended.

    Without a device, nothing happens: the real compute's end (`ended`) stands."""
    if device is None:
        return ended
    compute_s = ended - started
    nominal_s = device.nominal_s(job_steps(config, num_examples))
    padded_s = max(nominal_s - compute_s, 0.0)
    if padded_s > 0:
        time.sleep(padded_s)  # the emulated device is busy: nothing to wait on
    log.info("device_emulated", emulation=True, compute_s=round(compute_s, 4),
             nominal_s=round(nominal_s, 4), padded_s=round(padded_s, 4),
             overran=compute_s > nominal_s, slowdown=device.slowdown, step_s=device.step_s,
             call=next(_CALLS))
    return time.perf_counter()
