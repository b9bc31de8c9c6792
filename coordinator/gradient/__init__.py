"""Batch-gradient federation (`--mode gradient`): slots that step on clients' gradients.

`runner.GradientSlotRunner` runs such a slot beside (or instead of) weight
slots, on the same lease broker, jobs table and result dispatcher;
`optimizer` holds its server optimiser. The agent's side is
`client_agent.gradient`, the trainer's `trainer_worker.gradient`, the wire
`bus.gradient` and `serialization.gradient`.
"""

from __future__ import annotations

import torch

from coordinator.context import RunContext
from coordinator.gradient.optimizer import FlatModel, ServerOptimizer
from coordinator.gradient.runner import GradientSlotRunner
from serialization import decode

__all__ = ["GradientModeError", "GradientSlotRunner", "make_runner"]


class GradientModeError(ValueError):
    """The task's model cannot run in gradient mode."""


def make_runner(ctx: RunContext, slot_id: int, state: dict[str, torch.Tensor],
                first_round: int) -> GradientSlotRunner:
    """A gradient slot starting at `first_round` (its optimiser restored when resuming)."""
    s = ctx.settings
    buffers = ctx.evaluator.float_buffers()
    if buffers:
        raise GradientModeError(f"gradient mode cannot carry the model's floating-point "
                                f"buffers {buffers[:3]} (BatchNorm statistics)")
    optimizer = ServerOptimizer(s.server_optimizer, s.server_optimizer_options())
    model = FlatModel(state, ctx.evaluator.parameter_shapes(), optimizer)
    path = ctx.run_state.store.model_path(slot_id, first_round - 1, "strategy")
    if first_round > 1 and path.exists():
        model.load_optimizer_state(dict(decode(path.read_bytes())[0]))
    return GradientSlotRunner(ctx, slot_id, model, first_round)
