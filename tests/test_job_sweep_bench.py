"""bench.job_sweep: settings parse, and a tiny simulated run counts rounds and steps."""

from __future__ import annotations

import argparse

import pytest

from bench import job_sweep
from trainer_worker import data


def test_settings_parse_over_the_default_job() -> None:
    """KEY=VALUE pairs override the default job; unknown keys and bad values are refused."""
    got = job_sweep.JobSetting.parse("local_steps=0,epochs=2,lr=0.05")
    assert (got.local_steps, got.epochs, got.lr, got.batch_size) == (0, 2, 0.05, 32)
    assert got.label().startswith("2 epoch(s), b32, lr 0.05")
    for bad in ("speed=3", "lr=fast", "lr"):
        with pytest.raises(argparse.ArgumentTypeError):
            job_sweep.JobSetting.parse(bad)


def test_first_round_reaching_a_target() -> None:
    """The first round at or above the target, or None."""
    assert job_sweep.first_round([0.7, 0.85, 0.9], 0.85) == 2
    assert job_sweep.first_round([0.7], 0.85) is None


@pytest.mark.skipif(data.find_data_dir(environ={}) is None,
                    reason="needs the Fashion-MNIST IDX files")
def test_simulated_round_counts_the_busier_trainers_steps() -> None:
    """Six clients of 3 steps on two trainers: 9 critical steps a round; accuracy per round."""
    setting = job_sweep.JobSetting(local_steps=3, batch_size=8)
    out = job_sweep.simulate(setting, seed=0, rounds=2)
    assert out["critical_steps"] == [9, 9]
    assert len(out["accuracy"]) == 2
    assert all(0.0 <= a <= 1.0 for a in out["accuracy"])
