"""The custom-strategy example, loaded by import path, runs a real federation end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bus.embedded import EmbeddedRedis
from serialization import decode
from tests.e2e import retrained_mean, start_coordinator

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLE = "coordinator.strategies.examples:ServerLrFedAvg"


def checkpoint(runs_dir: Path, run_id: str, round_: int) -> dict[str, torch.Tensor]:
    path = runs_dir / run_id / "checkpoints" / "slot0" / f"round{round_:05d}.pwfl"
    return {k: v.clone() for k, v in decode(path.read_bytes())[0].items()}


def test_example_strategy_by_import_path_end_to_end(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """`--strategy module:Class --strategy-option server_lr=0.5` on real agents: round 2's
    model is round 1's plus half the way to its clients' weighted mean, recomputed here."""
    args = ["--task", "synthetic", "--slots", "1", "--clients", "2", "--rounds", "2",
            "--local-agents", "1", "--keep-checkpoints", "5",
            "--strategy", EXAMPLE, "--strategy-option", "server_lr=0.5"]  # fmt: skip
    run = start_coordinator(redis_server.url, tmp_path, "e2e-example", *args)
    with run:
        assert run.wait(240) == 0, run.output()[-4000:]
    events = run.events()
    assert events[0]["strategy"] == EXAMPLE
    previous, new = checkpoint(tmp_path, run.run_id, 1), checkpoint(tmp_path, run.run_id, 2)
    means = retrained_mean(events, 0, 2, previous, num_clients=2)
    for name, value in new.items():
        mean = means[name]
        expected = previous[name].double() + 0.5 * (mean - previous[name].double())
        if not value.dtype.is_floating_point:
            expected = mean.round()
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
