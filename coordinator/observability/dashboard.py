"""The live dashboard's state and its Server-Sent Events stream.

`DashboardState` folds the run's events into what the page shows, each part
bounded (accuracy points and lease segments per slot and client, merged busy
intervals): accuracy over time, which client trains for which slot, rejected
and late updates, busy time of clients and coordinator. `DashboardHub` streams
it to browsers: a full snapshot when a page connects (so a page opened mid-run,
or reconnecting after a drop, starts from the truth), then every half second the
new points and segments plus the current `/status`. Each op carries a sequence number and a
snapshot the last one it holds, so a page never applies an op twice. The run's end is sent as a
snapshot marked final, which the page keeps showing after the server has gone.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from coordinator.observability.metrics import BUSY_KIND_OF_EVENT, event_seconds, event_ts
from serialization import slot_events as se

MAX_POINTS_PER_SLOT = 2000
MAX_SEGMENTS_PER_CLIENT = 400
FLUSH_EVERY_S = 0.5
QUEUE_MAX = 64  # messages a slow browser may lag behind before it gets a fresh snapshot
BUSY_HORIZON_S = 600.0  # busy intervals older than this are only a total
RUN_FIELDS = ("slots", "rounds", "expected_clients", "policy", "client_choice", "quorum",
              "min_clients", "clients_per_round", "deadline_s", "late_policy", "strategy",
              "task", "model_nbytes", "seed", "signing")
Op = list[Any]


class IntervalUnion:
    """Length of a union of intervals that arrive roughly in order, in bounded memory: each
    add merges with its neighbours only (O(log n) to find them), and spans that ended more
    than BUSY_HORIZON_S before the newest one become a plain total."""

    def __init__(self) -> None:
        self._closed_s = 0.0
        self._spans: list[tuple[float, float]] = []  # disjoint, sorted

    def add(self, start: float, end: float) -> None:
        spans = self._spans
        i = bisect.bisect_left(spans, (start, end))
        spans.insert(i, (start, end))
        k = max(i - 1, 0)  # only the new span's neighbours can overlap it
        while k + 1 < len(spans):
            (a, b), (c, d) = spans[k], spans[k + 1]
            if c <= b:
                spans[k] = (a, max(b, d))
                del spans[k + 1]
            elif k >= i:
                break
            else:
                k += 1
        old = bisect.bisect_left(spans, (end - BUSY_HORIZON_S, float("-inf")))
        old = min(old, len(spans) - 1)
        if old > 0 and spans[old - 1][1] < end - BUSY_HORIZON_S:
            self._closed_s += sum(b - a for a, b in spans[:old])
            del spans[:old]

    @property
    def length_s(self) -> float:
        return self._closed_s + sum(b - a for a, b in self._spans)


class CoordinatorBusy:
    """The coordinator's work: seconds by kind (kinds overlap), and their union."""

    def __init__(self) -> None:
        self.by_kind_s: dict[str, float] = {}
        self.union = IntervalUnion()

    def add(self, kind: str, start: float, end: float) -> None:
        self.by_kind_s[kind] = self.by_kind_s.get(kind, 0.0) + (end - start)
        self.union.add(start, end)


class DashboardState:
    """What the page shows, folded from events; `apply` returns the ops a live page needs."""

    def __init__(self, run_id: str, started_at: float) -> None:
        self.run_id = run_id
        self.t0 = started_at
        self.run: dict[str, Any] = {}
        self.accuracy: dict[str, deque[Op]] = {}
        self.timeline: dict[str, deque[dict[str, Any]]] = {}
        self._open: dict[tuple[str, str], dict[str, Any]] = {}  # (client, slot) -> segment
        self.client_busy_s: dict[str, float] = {}
        self.late: Counter[str] = Counter()
        self.coordinator = CoordinatorBusy()
        self.final = False
        self.active_t: float | None = None  # the first lease: clients are there, rounds go

    def _t(self, event: Mapping[str, Any]) -> float:
        return round(event_ts(event) - self.t0, 3)

    def apply(self, event: Mapping[str, Any]) -> list[Op]:
        name = str(event.get("event"))
        kind = BUSY_KIND_OF_EVENT.get(name)
        if kind is not None and (seconds := event_seconds(event)) is not None:
            self.coordinator.add(kind, event_ts(event) - seconds, event_ts(event))
        handler = self._handlers.get(name)
        return handler(self, event) if handler is not None else []

    def _run_started(self, event: Mapping[str, Any]) -> list[Op]:
        self.run = {k: event.get(k) for k in RUN_FIELDS if k in event}
        return [["run", self.run]]

    def _evaluation(self, event: Mapping[str, Any]) -> list[Op]:
        accuracy = event.get("accuracy")
        if not isinstance(accuracy, int | float):
            return []
        slot = str(event.get("slot_id"))
        point = [self._t(event), float(accuracy), event.get("round")]
        self.accuracy.setdefault(slot, deque(maxlen=MAX_POINTS_PER_SLOT)).append(point)
        return [["acc", slot, *point]]

    def _lease_taken(self, event: Mapping[str, Any]) -> list[Op]:
        client, slot, start = str(event.get("client_id")), str(event.get("slot_id")), self._t(event)
        segment = {"slot": slot, "round": event.get("round"), "start": start, "end": None,
                   "outcome": None}
        if self.active_t is None:
            self.active_t = start
        self.timeline.setdefault(client, deque(maxlen=MAX_SEGMENTS_PER_CLIENT)).append(segment)
        self._open[(client, slot)] = segment
        return [["seg", client, segment]]

    def _lease_returned(self, event: Mapping[str, Any]) -> list[Op]:
        client, slot = str(event.get("client_id")), event.get("slot_id")
        ops: list[Op] = []
        for key in [k for k in self._open if k[0] == client and (slot is None
                                                                 or k[1] == str(slot))]:
            segment = self._open.pop(key)
            segment["end"], segment["outcome"] = self._t(event), event.get("reason")
            busy_s = segment["end"] - segment["start"]
            self.client_busy_s[client] = self.client_busy_s.get(client, 0.0) + busy_s
            ops.append(["seg", client, segment])
        return ops

    def _update_late(self, event: Mapping[str, Any]) -> list[Op]:
        self.late[str(event.get("action"))] += 1
        return []

    def _run_finished(self, _event: Mapping[str, Any]) -> list[Op]:
        self.final = True
        return []

    _handlers: dict[str, Callable[[DashboardState, Mapping[str, Any]], list[Op]]] = {
        "run_started": _run_started, "run_resumed": _run_started,
        se.EvaluationFinished.name: _evaluation, "lease_taken": _lease_taken,
        "lease_returned": _lease_returned, se.UpdateLate.name: _update_late,
        "run_finished": _run_finished,
    }

    def summary(self, status: dict[str, Any]) -> dict[str, Any]:
        """The small part sent every flush: /status (less its accuracy lists) and busy times."""
        now_t = round(time.time() - self.t0, 3)
        busy = dict(self.client_busy_s)
        for (client, _slot), segment in self._open.items():
            busy[client] = busy.get(client, 0.0) + max(0.0, now_t - segment["start"])
        slots = [{k: v for k, v in s.items() if k != "accuracies"}
                 for s in status.get("slots", [])]
        return {"status": {**status, "slots": slots}, "now_t": now_t, "final": self.final,
                "active_t": self.active_t,
                "late": dict(self.late), "client_busy_s": busy,
                "coordinator_busy_s": dict(self.coordinator.by_kind_s),
                "coordinator_union_s": self.coordinator.union.length_s}

    def snapshot(self, status: dict[str, Any]) -> dict[str, Any]:
        return {"run_id": self.run_id, "t0": self.t0, "run": self.run,
                "accuracy": {k: list(v) for k, v in self.accuracy.items()},
                "timeline": {k: list(v) for k, v in self.timeline.items()},
                **self.summary(status)}


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class DashboardHub:
    """Feeds every connected page: snapshot on connect, then deltas every FLUSH_EVERY_S."""

    def __init__(self, state: DashboardState, status: Callable[[], dict[str, Any]]) -> None:
        self.state = state
        self._status = status
        self._ops: list[Op] = []  # [seq, kind, ...]: a page skips what its snapshot held
        self._seq = 0
        self._queues: set[asyncio.Queue[bytes | None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker: asyncio.Task[None] | None = None

    def observe(self, event: Mapping[str, Any]) -> None:
        """The structlog observer; thread-safe (events may come from worker threads)."""
        if self._loop is not None and _on_other_thread(self._loop):
            self._loop.call_soon_threadsafe(self.observe, dict(event))
            return
        for op in self.state.apply(event):
            self._seq += 1
            self._ops.append([self._seq, *op])
        if self.state.final and self._loop is not None:
            self._loop.call_soon(self.flush)  # the end goes out at once, before the server stops

    def flush(self) -> None:
        ops, self._ops = self._ops, []
        if not self._queues:
            return
        message = sse("delta", {"ops": ops, **self.state.summary(self._status())})
        for queue in self._queues:
            if queue.qsize() >= QUEUE_MAX:  # a page that cannot keep up starts over
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(b"")
            queue.put_nowait(message)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            self.flush()

    async def start(self, _app: web.Application) -> None:
        """aiohttp on_startup: flush from now on."""
        self._loop = asyncio.get_running_loop()
        self._ticker = asyncio.create_task(self._tick(), name="dashboard-flush")

    async def close(self, _app: web.Application) -> None:
        """aiohttp on_shutdown: end every stream (the pages keep their last state)."""
        self.flush()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for queue in self._queues:
            queue.put_nowait(None)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """GET /events: text/event-stream."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._queues.add(queue)
        try:
            message: bytes | None = b""
            while message is not None:
                if not message:  # the first message, or after an overflow: the whole state
                    snapshot = {**self.state.snapshot(self._status()), "seq": self._seq}
                    message = b"retry: 2000\n" + sse("snapshot", snapshot)
                await response.write(message)
                message = await queue.get()
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self._queues.discard(queue)
        return response


def _on_other_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is not loop
    except RuntimeError:
        return True
