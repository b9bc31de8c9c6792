"""A slot's evaluate-and-checkpoint chain, behind its rounds.

Round r's evaluation and checkpoint run in the background, in round order, while
round r+1 already trains. A round whose evaluation has not started when a newer
due round closes is checkpointed without one (``evaluation_skipped``), so a slow
evaluator skips ahead instead of holding the slot; only when `max_behind` rounds
are queued (each holds its model twice) does the slot wait: memory stays bounded.
The same chain serves weight rounds and gradient sessions.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from coordinator.evaluation import Evaluator, evaluate_round, max_behind
from coordinator.population.config import SlotConfig
from coordinator.run_state import RunState
from coordinator.settings import CoordinatorSettings
from coordinator.slots.protocol import ClosedRound, State
from coordinator.status import RunStatus
from serialization.slot_events import RoundClosed, emit

log = structlog.get_logger()


class EvaluationChain:
    """Evaluates and checkpoints one slot's closed rounds, in order, off its round loop."""

    def __init__(self, slot_id: int, *, evaluator: Evaluator, run_state: RunState,
                 status: RunStatus, settings: CoordinatorSettings) -> None:
        self.slot_id = slot_id
        self._evaluator = evaluator
        self._run_state = run_state
        self._status = status
        self._settings = settings
        self._newest: asyncio.Task[None] | None = None  # the newest link
        self._behind = 0  # links not finished yet
        self._newest_closed = 0

    async def after_round(self, closed: ClosedRound, opened_at: float) -> None:
        """Queue `closed`'s evaluation and checkpoint; waits only when `max_behind` are."""
        if self._behind >= max_behind(len(closed.payload)) and self._newest is not None:
            await asyncio.shield(self._newest)
        self._newest_closed = closed.round
        self._behind += 1
        self._newest = asyncio.create_task(
            self._link(self._newest, closed, opened_at),
            name=f"slot{self.slot_id}-round{closed.round}-eval")

    async def settle(self) -> None:
        """Wait for the newest link (and so every earlier one)."""
        if self._newest is not None:
            await self._newest

    async def _link(self, previous: asyncio.Task[None] | None, closed: ClosedRound,
                    opened_at: float) -> None:
        try:
            if previous is not None:
                await previous  # rounds are checkpointed in order
            with structlog.contextvars.bound_contextvars(slot_id=self.slot_id):
                metrics = await self._evaluate(closed.round, closed.state)
                await self._run_state.checkpoint(self.slot_id, closed.round, closed.payload,
                                                 closed.strategy_state, metrics)
                self._closed(closed, metrics, time.monotonic() - opened_at)
        finally:
            self._behind -= 1

    async def _evaluate(self, round_: int, state: State) -> dict[str, float]:
        s = self._settings
        return await evaluate_round(self._evaluator, self.slot_id, round_, state,
                                    eval_every=s.central_every, last_round=s.rounds,
                                    newest_round=self._newest_closed)

    def _closed(self, closed: ClosedRound, metrics: dict[str, float], duration_s: float) -> None:
        status = self._status.slots[self.slot_id]
        accuracy = metrics.get("accuracy") if metrics else None
        status.record_evaluated(closed.round)
        if accuracy is not None:
            status.record_accuracy(closed.round, accuracy, self._status.elapsed_s)
        emit(log, RoundClosed(self.slot_id, round=closed.round, duration_s=round(duration_s, 6),
                              accuracy=accuracy, num_updates=closed.num_updates,
                              more=closed.fields))

    def checkpoint_replaced(self, round_: int, payload: bytes, strategy_state: State,
                            config: SlotConfig) -> None:
        """PBT or a merge replaced the model: checkpointed as round `round_` with the new
        configuration, so a resumed run goes on from it; queued behind the round's own
        link (which evaluates the model the round closed with), never waited for."""
        flat: dict[str, Any] = config.flat()
        self._status.slots[self.slot_id].config = flat
        self._behind += 1
        self._newest = asyncio.create_task(
            self._replaced_link(self._newest, round_, payload, strategy_state, flat),
            name=f"slot{self.slot_id}-round{round_}-replaced")

    async def _replaced_link(self, previous: asyncio.Task[None] | None, round_: int,
                             payload: bytes, strategy_state: State, flat: dict[str, Any]) -> None:
        try:
            if previous is not None:
                await previous
            run_state = self._run_state
            run_state.doc.setdefault("slot_configs", {})[str(self.slot_id)] = flat
            if not strategy_state:  # a stateless strategy now: no stale moments for --resume
                path = run_state.store.model_path(self.slot_id, round_, "strategy")
                path.unlink(missing_ok=True)
            await run_state.checkpoint(self.slot_id, round_, payload, strategy_state, {})
        finally:
            self._behind -= 1
