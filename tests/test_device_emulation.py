"""Emulated devices (`trainer_worker.emulation`): training calls padded to a nominal time."""

from __future__ import annotations

import time

import pytest
from structlog.testing import capture_logs

from trainer_worker.emulation import EmulatedDevice, EmulationError, job_steps, pad
from trainer_worker.task import TrainConfig


def test_parse_reads_step_and_slowdown_and_round_trips() -> None:
    """'step_s=0.05,slowdown=4' is a device 4x slower than 50 ms a step, and prints back."""
    device = EmulatedDevice.parse("step_s=0.05,slowdown=4")
    assert device == EmulatedDevice(0.05, 4.0)
    assert EmulatedDevice.parse(device.to_text()) == device
    assert device.nominal_s(10) == pytest.approx(2.0)


@pytest.mark.parametrize("text", ["", "slowdown=2", "step_s=0", "step_s=0.1,slowdown=0.5",
                                  "step_s=0.1,speed=2", "step_s=x"])
def test_parse_refuses_what_is_not_a_device(text: str) -> None:
    """No step time, a non-positive one, a speed-up or an unknown key is refused."""
    with pytest.raises(EmulationError):
        EmulatedDevice.parse(text)


def test_job_steps_follow_the_job_config() -> None:
    """A step budget counts as is, a cap bounds whole epochs, no-op jobs count their cap."""
    assert job_steps(TrainConfig(local_steps=80), 10_000) == 80
    assert job_steps(TrainConfig(max_steps=40, batch_size=32), 10_000) == 40
    assert job_steps(TrainConfig(max_steps=400, batch_size=32), 320) == 10
    assert job_steps(TrainConfig(epochs=2, batch_size=32), 100) == 8
    assert job_steps(TrainConfig(max_steps=40, noop=True), 1) == 40


def test_pad_sleeps_to_the_nominal_time_and_says_it_is_emulation() -> None:
    """A fast call is padded to steps x step_s x slowdown and logged as not overrun."""
    device = EmulatedDevice(step_s=0.01, slowdown=2)
    started = time.perf_counter()
    with capture_logs() as logs:
        ended = pad(device, started, started, TrainConfig(local_steps=5), 1)
    assert ended - started >= 0.1
    (event,) = [e for e in logs if e["event"] == "device_emulated"]
    assert event["emulation"] is True
    assert event["overran"] is False


def test_pad_counts_a_call_that_overran_its_nominal_time() -> None:
    """Real compute longer than the nominal time is not padded and is logged as overran."""
    device = EmulatedDevice(step_s=0.001)
    with capture_logs() as logs:
        ended = pad(device, 0.0, 5.0, TrainConfig(local_steps=1), 1)
    assert ended >= 5.0
    assert [e["overran"] for e in logs if e["event"] == "device_emulated"] == [True]


def test_without_a_device_the_real_end_stands() -> None:
    """No emulation: pad returns the real end and logs nothing."""
    with capture_logs() as logs:
        assert pad(None, 1.0, 2.0, TrainConfig(), 1) == 2.0
    assert logs == []
