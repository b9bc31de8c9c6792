"""The live dashboard's state and its Server-Sent Events stream.

`DashboardState` folds the run's events into what the page shows, each part
bounded (accuracy points and lease segments per slot and client, merged busy
intervals): accuracy over time (the test set's, `evaluation_finished`, and the clients'
validation splits', `validation_finished`), which client trains for which slot, rejected
and late updates, busy time of clients and coordinator. Busy fractions are each of their
own capacity, so none exceeds 1: the coordinator's round work (publish, fold, aggregate,
checkpoint: the union of their intervals) over the elapsed time, the evaluation thread's
busy seconds over elapsed time x its workers, each client's leases over the elapsed time.
`DashboardHub` streams it to browsers: a full snapshot when a page connects (so a page
opened mid-run, or reconnecting after a drop, starts from the truth), then every half
second the new points and segments plus the current `/status`. Each op carries a sequence
number and a snapshot the last one it holds, so a page never applies an op twice. The run's
end is sent as a snapshot marked final, which the page keeps showing after the server has
gone.
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


class PoolBusy:
    """Busy worker-seconds of a pool of `workers` threads that take queued work in order,
    from each piece's [queued, finished] interval (an evaluation's `duration_s` includes its
    wait for the thread): while n pieces are in flight, min(n, workers) threads work. So the
    total never exceeds elapsed x workers, however the intervals overlap. Bounded like
    `IntervalUnion`: what lies more than BUSY_HORIZON_S before the newest end is a total."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, workers)
        self._closed_s = 0.0
        self._spans: list[tuple[float, float]] = []  # sorted by start

    def add(self, start: float, end: float) -> None:
        bisect.insort(self._spans, (start, end))
        cut = end - BUSY_HORIZON_S
        if any(b <= cut for _a, b in self._spans):
            self._closed_s += self._busy_s(self._spans, until=cut)
            self._spans = [(max(a, cut), b) for a, b in self._spans if b > cut]

    def _busy_s(self, spans: list[tuple[float, float]], until: float = float("inf")) -> float:
        edges = sorted([(a, 1) for a, _b in spans] + [(b, -1) for _a, b in spans])
        total, running, previous = 0.0, 0, None
        for t, step in edges:
            t = min(t, until)
            if previous is not None and t > previous:
                total += min(running, self.workers) * (t - previous)
            previous, running = t, running + step
        return total

    @property
    def busy_s(self) -> float:
        """Worker-seconds: divide by elapsed x `workers` for the pool's busy fraction."""
        return self._closed_s + self._busy_s(self._spans)


EVALUATION_KIND = BUSY_KIND_OF_EVENT[se.EvaluationFinished.name]


class CoordinatorBusy:
    """The coordinator's work, each part measured against its own capacity: per kind the
    union of its intervals (several slots' work of a kind overlaps), the round work (every
    kind but evaluation: the event loop and its short worker-thread calls) as one union, and
    the evaluation thread(s) as a pool (`PoolBusy`): evaluations run there, beside the
    rounds, so adding them to the round work would count two places at once as one."""

    def __init__(self, eval_workers: int = 1) -> None:
        self.by_kind: dict[str, IntervalUnion] = {}
        self.rounds = IntervalUnion()
        self.evaluation = PoolBusy(eval_workers)
        self.first_start: float | None = None

    def add(self, kind: str, start: float, end: float) -> None:
        self.first_start = start if self.first_start is None else min(self.first_start, start)
        if kind == EVALUATION_KIND:
            self.evaluation.add(start, end)
        else:
            self.by_kind.setdefault(kind, IntervalUnion()).add(start, end)
            self.rounds.add(start, end)

    def set_eval_workers(self, workers: int) -> None:
        if workers != self.evaluation.workers and not self.evaluation.busy_s:
            self.evaluation = PoolBusy(workers)

    @property
    def by_kind_s(self) -> dict[str, float]:
        """Busy seconds per kind (evaluation: the evaluation threads' busy seconds)."""
        kinds = {kind: union.length_s for kind, union in self.by_kind.items()}
        if self.evaluation.busy_s:
            kinds[EVALUATION_KIND] = self.evaluation.busy_s
        return kinds


class DashboardState:
    """What the page shows, folded from events; `apply` returns the ops a live page needs."""

    def __init__(self, run_id: str, started_at: float) -> None:
        self.run_id = run_id
        self.t0 = started_at
        self.run: dict[str, Any] = {}
        self.accuracy: dict[str, deque[Op]] = {}  # test set: [t, accuracy, round]
        # the clients' validation splits: [t, accuracy, round of the model, during_round]
        self.validation: dict[str, deque[Op]] = {}
        self.timeline: dict[str, deque[dict[str, Any]]] = {}
        self._open: dict[tuple[str, str], dict[str, Any]] = {}  # (client, slot) -> segment
        self.client_busy_s: dict[str, float] = {}  # closed leases (a union per client)
        self._client_busy: dict[str, IntervalUnion] = {}
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
        workers = event.get("eval_workers")  # evaluations run at once (the Evaluator: 1)
        if isinstance(workers, int) and not isinstance(workers, bool) and workers > 0:
            self.coordinator.set_eval_workers(workers)
        return [["run", self.run]]

    def _evaluation(self, event: Mapping[str, Any]) -> list[Op]:
        accuracy = event.get("accuracy")
        if not isinstance(accuracy, int | float):
            return []
        slot = str(event.get("slot_id"))
        point = [self._t(event), float(accuracy), event.get("round")]
        self.accuracy.setdefault(slot, deque(maxlen=MAX_POINTS_PER_SLOT)).append(point)
        return [["acc", slot, *point]]

    def _validation(self, event: Mapping[str, Any]) -> list[Op]:
        accuracy = event.get("accuracy")
        if isinstance(accuracy, bool) or not isinstance(accuracy, int | float):
            return []
        slot = str(event.get("slot_id"))
        point = [self._t(event), float(accuracy), event.get("round"), event.get("during_round")]
        self.validation.setdefault(slot, deque(maxlen=MAX_POINTS_PER_SLOT)).append(point)
        return [["val", slot, *point]]

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
            union = self._client_busy.setdefault(client, IntervalUnion())
            union.add(segment["start"], max(segment["start"], segment["end"]))
            self.client_busy_s[client] = union.length_s
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
        se.EvaluationFinished.name: _evaluation, se.ValidationFinished.name: _validation,
        "lease_taken": _lease_taken,
        "lease_returned": _lease_returned, se.UpdateLate.name: _update_late,
        "run_finished": _run_finished,
    }

    def busy_since_t(self) -> float | None:
        """Where busy fractions start: the first lease (clients are there, rounds go), or
        earlier coordinator work (seconds since the run started)."""
        first = self.coordinator.first_start
        starts = [t for t in (self.active_t, None if first is None else first - self.t0)
                  if t is not None]
        return min(starts) if starts else None

    def busy(self, now_t: float) -> dict[str, Any]:
        """Busy seconds and fractions up to `now_t` (s since start), each fraction of its own
        capacity: none exceeds 1."""
        clients = dict(self.client_busy_s)
        for (client, _slot), segment in self._open.items():
            clients[client] = clients.get(client, 0.0) + max(0.0, now_t - segment["start"])
        since = self.busy_since_t()
        span = max(now_t - since, 1e-6) if since is not None else 0.0
        coordinator, evaluation = self.coordinator, self.coordinator.evaluation

        def share(seconds: float, capacity: float = 1.0) -> float:
            return seconds / (span * capacity) if span > 0 else 0.0

        kinds = {k: v for k, v in coordinator.by_kind_s.items() if k != EVALUATION_KIND}
        return {
            "busy_since_t": since, "client_busy_s": clients,
            "coordinator_busy_s": kinds, "round_work_s": coordinator.rounds.length_s,
            "evaluation_busy_s": evaluation.busy_s, "eval_workers": evaluation.workers,
            "busy_fractions": {
                "round_work": share(coordinator.rounds.length_s),
                "evaluation": share(evaluation.busy_s, evaluation.workers),
                "kinds": {k: share(v) for k, v in kinds.items()},
                "clients": {c: share(v) for c, v in clients.items()},
            },
        }

    def summary(self, status: dict[str, Any], now_t: float | None = None) -> dict[str, Any]:
        """The small part sent every flush: /status (less its accuracy lists) and busy times."""
        now_t = round(time.time() - self.t0, 3) if now_t is None else now_t
        slots = [{k: v for k, v in s.items() if k not in ("accuracies", "validation_accuracies")}
                 for s in status.get("slots", [])]
        return {"status": {**status, "slots": slots}, "now_t": now_t, "final": self.final,
                "active_t": self.active_t, "late": dict(self.late), **self.busy(now_t)}

    def snapshot(self, status: dict[str, Any]) -> dict[str, Any]:
        return {"run_id": self.run_id, "t0": self.t0, "run": self.run,
                "accuracy": {k: list(v) for k, v in self.accuracy.items()},
                "validation": {k: list(v) for k, v in self.validation.items()},
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
