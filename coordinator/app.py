"""The coordinator: start-up, main loop, shutdown, as three plain steps.

Start-up connects to Redis, loads the task, builds (or restores) each slot's
model and announces the run. The main loop runs the services (client tracker,
result dispatcher, progress, HTTP) and one task per slot inside task groups;
it ends when every slot has finished its rounds. Shutdown marks the run
finished (agents that serve only this run leave), stops what it started and
returns a summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from typing import Any

import structlog

from bus.keys import Keys
from bus.registry import Registry, set_active_run
from coordinator.checkpoints import json_safe
from coordinator.http import StatusServer
from coordinator.local_agents import AgentAccess, LocalAgents
from coordinator.observability import LatestModel, Observability
from coordinator.population.config import SlotConfig, run_configs
from coordinator.population.final import run_final_merge
from coordinator.progress import Progress
from coordinator.results.figures import Validation
from coordinator.settings import CoordinatorSecrets, CoordinatorSettings
from coordinator.slots.protocol import State
from coordinator.status import RunStatus
from coordinator.trimming import StreamTrimmer
from coordinator.wiring import RunParts, build

log = structlog.get_logger()
SHUTDOWN_WRITE_S = 5.0  # the final status write; Redis gone by then is not waited for
AGENTS_LEAVE_S = 5.0  # how long the end waits for agents to see it (they look every 0.5 s)


@dataclass(frozen=True)
class RunOutcome:
    """How a coordinator run ended, as `python -m coordinator` prints it (the replay's
    `replay.summary.RunSummary` is the log's account of a run, a different thing)."""

    run_id: str
    status: str
    wall_s: float
    slots: list[dict[str, Any]]
    rejected: dict[str, int]
    events_path: str
    http_url: str


class Coordinator:
    def __init__(self, settings: CoordinatorSettings, *, resume_state: dict[str, Any] | None = None,
                 show_progress: bool | None = None,
                 secrets: CoordinatorSecrets | None = None) -> None:
        self.settings = settings
        self._resume = resume_state
        self._secrets = secrets or CoordinatorSecrets()
        self.status = RunStatus(settings.run_id)
        self._progress = Progress(self.status, live=show_progress)
        self.observability = Observability(
            self.status, self._status_json, models=self._latest_model,
            checkpoints=lambda: self.parts.run_state.store if self.parts else None)
        self._http = StatusServer(self._status_json, settings.http_host, settings.http_port,
                                  token=self._secrets.api_token, on_stop=self.request_stop,
                                  observability=self.observability)
        self._agents: LocalAgents | None = None
        self._run_open = asyncio.Event()
        self._task: asyncio.Task[Any] | None = None
        self.stop_requested = False
        self.parts: RunParts | None = None

    @functools.cached_property
    def configs(self) -> dict[int, SlotConfig]:
        return run_configs(self.settings, (self._resume or {}).get("slot_configs"))

    def _status_json(self) -> dict[str, Any]:
        leases = self.parts.leases.pool.leases if self.parts else {}
        return self.status.as_dict(leases)

    def _latest_model(self, slot_id: int) -> LatestModel | None:
        slot = self.parts.slots.get(slot_id) if self.parts else None
        return None if slot is None else LatestModel(*slot.rounds.latest_model())

    def request_stop(self, source: str) -> None:
        """Stop gracefully, as on SIGTERM: the run ends "interrupted" and can be resumed."""
        log.warning("run_stop_requested", source=source)
        self.stop_requested = True
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> RunOutcome:
        structlog.contextvars.bind_contextvars(run_id=self.settings.run_id)
        self.observability.attach()
        self._task = asyncio.current_task()
        started = time.monotonic()
        try:
            self.parts = await build(self.settings, self._secrets, self.configs, self._resume,
                                     self.status)
            await self._announce(self.parts)
            await self._main(self.parts)
            # A slot that gave up (slot_failed) lets the others finish; the run did not.
            failed = any(slot.state == "failed" for slot in self.status.slots.values())
            self.status.state = "failed" if failed else "finished"
        except asyncio.CancelledError:
            self.status.state = "interrupted"
            raise
        except BaseException:
            self.status.state = "failed"
            raise
        finally:
            await asyncio.shield(self._shutdown(time.monotonic() - started))
        return self._summary(time.monotonic() - started)

    # --- start-up -------------------------------------------------------------------------

    async def _announce(self, parts: RunParts) -> None:
        s = self.settings
        await parts.run_state.announce(self._state_doc())
        await set_active_run(parts.redis, s.run_id)
        advert = parts.handoff.advert if parts.handoff is not None else None
        await parts.redis.hset(parts.keys.state(), mapping={
            "status": "running", "slots": s.slots, "rounds": s.rounds,
            # Agents check these before registering: those on this host say so.
            "handoff": advert.name if advert else "",
            "handoff_digest": advert.digest if advert else "",
            # Agents load the task to declare their clients' sizes (client_agent.declaration).
            "task": s.task, "task_options": json.dumps(s.full_task_options())})
        first = parts.slots[0].rounds.state
        model_nbytes = sum(t.numel() * t.element_size() for t in first.values())
        event = "run_resumed" if self._resume else "run_started"
        log.info(event, slots=s.slots, rounds=s.rounds, expected_clients=s.expected_clients,
                 policy=s.policy, client_choice=s.client_choice, quorum=s.quorum,
                 min_clients=s.min_clients,
                 clients_per_round=s.round_size, deadline_s=s.deadline_s,
                 late_policy=s.late_policy, strategy=s.strategy, task=s.task,
                 model_nbytes=model_nbytes, seed=s.seed, mode=s.mode,
                 gradient_slots=[i for i in range(s.slots) if s.is_gradient_slot(i)],
                 signing=self._secrets.keyring is not None,
                 slot_configs=[self.configs[i].flat() for i in sorted(self.configs)],
                 population=s.population, merge=s.merge, merge_every=s.merge_every,
                 shared_init=s.shared_init, local_handoff=parts.handoff is not None,
                 rounds_done={slot.slot_id: slot.first_round - 1 for slot in parts.slots})
        if parts.orphans:
            log.warning("shm_orphans_removed", segments=parts.orphans)
        if self._secrets.api_token_file is not None:
            log.info("api_token_generated", path=self._secrets.api_token_file)
        await self._http.start(fallback_to_any_port=s.http_port == 8765)

    def _state_doc(self) -> dict[str, Any]:
        previous = self._resume or {}
        configs = {str(i): c.flat() for i, c in self.configs.items()}
        return {"run_id": self.settings.run_id, "slots": previous.get("slots", {}),
                "slot_configs": configs,
                "settings": json_safe(dataclasses.asdict(self.settings))}

    # --- main loop ------------------------------------------------------------------------

    async def _main(self, parts: RunParts) -> None:
        trimmer = StreamTrimmer(parts.redis, parts.keys, self.settings.slots,
                                lambda: parts.tracker.live)
        await parts.tracker.poll()  # clients known before any result is judged (a resumed run's)
        async with asyncio.TaskGroup() as services:
            service_tasks = [services.create_task(parts.tracker.run(), name="client-tracker"),
                             services.create_task(trimmer.run(), name="stream-trimmer"),
                             services.create_task(parts.dispatcher.run(), name="results"),
                             services.create_task(self._progress.run(), name="progress")]
            try:
                if await self._start_local_agents():
                    assert self._agents is not None
                    service_tasks.append(services.create_task(
                        self._agents.watch(self._run_open), name="local-agents"))
                await self._wait_for_clients(parts)
                async with asyncio.TaskGroup() as slots:
                    for slot in parts.slots:
                        slots.create_task(slot.run(), name=f"slot-{slot.slot_id}")
                await self._after_slots(parts)
            finally:
                for task in service_tasks:
                    task.cancel()

    async def _after_slots(self, parts: RunParts) -> None:
        """`--merge final` picks the run's result: on validation figures (the clients'),
        then evaluated once on the test set; on the test set alone with --eval central."""
        s = self.settings
        if s.merge != "final":
            return
        finals = {slot.slot_id: slot.rounds.state for slot in parts.slots
                  if slot.status.state != "failed"}
        evaluator = parts.evaluator

        async def test(state: State) -> dict[str, float]:
            return await evaluator.evaluate_in_background(-1, state)

        if parts.scorer is not None:
            await run_final_merge(finals, parts.scorer.score, "validation",
                                  test if s.central_every else None, parts.run_state.store)
            parts.scorer.finished = True
            return

        async def on_test_set(_name: str, state: State) -> Validation | None:
            metrics = await test(state)
            return Validation(0, float(metrics.get("accuracy", 0.0)), metrics.get("loss"),
                              int(metrics.get("num_examples", 0)), 0)

        await run_final_merge(finals, on_test_set, "test set", test, parts.run_state.store)

    async def _start_local_agents(self) -> bool:
        s = self.settings
        if s.local_agents <= 0:
            return False
        self._agents = LocalAgents(redis_url=s.redis_url or "", run_id=s.run_id,
                                   run_dir=s.run_dir, devices=s.local_devices,
                                   threads=s.local_threads, access=self._agent_access())
        await self._agents.start([str(i) for i in range(s.expected_clients)], s.local_agents)
        return True

    def _agent_access(self) -> AgentAccess:
        """Local agents log in as the coordinator does, get their clients' keys and run the
        run's task."""
        s = self.settings
        options = {"--redis-user": s.redis_username, "--redis-ca-file": s.redis_ca_file,
                   "--redis-cert-file": s.redis_cert_file, "--redis-key-file": s.redis_key_file,
                   "--redis-outage-s": f"{s.redis_outage_s:g}"}
        return AgentAccess(redis_options=tuple(x for k, v in options.items() if v for x in (k, v)),
                           redis_password=self._secrets.redis_password,
                           keyring=self._secrets.keyring, allowed_task=s.task)

    async def _wait_for_clients(self, parts: RunParts) -> None:
        self.status.state = "waiting for clients"
        expected = self.settings.expected_clients
        try:
            async with asyncio.timeout(self.settings.wait_clients_s):
                await parts.tracker.wait_for(expected)
        except TimeoutError:
            log.warning("clients_missing", expected=expected, alive=len(parts.tracker.live))
        self.status.state = "running"
        self._run_open.set()
        parts.leases.open()

    # --- shutdown -------------------------------------------------------------------------

    async def _shutdown(self, wall_s: float) -> None:
        log.info("run_finished", wall_s=round(wall_s, 6), status=self.status.state)
        parts = self.parts
        if parts is not None:
            try:  # bounded: a run that gave up on Redis must not wait for it again
                async with asyncio.timeout(SHUTDOWN_WRITE_S):
                    await parts.redis.hset(parts.keys.state(), "status", self.status.state)
            except Exception as exc:  # noqa: BLE001 - shutdown goes on whatever Redis says
                log.warning("state_write_failed", error=str(exc) or type(exc).__name__)
            else:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(AGENTS_LEAVE_S):
                        await self._until_agents_left(parts.redis, parts.keys)
        if self._agents is not None:
            await self._agents.stop()
        await self._http.stop()
        if parts is not None and parts.handoff is not None:  # after the agents: nothing reads
            await asyncio.to_thread(parts.handoff.close)
        self.observability.detach()
        if parts is not None:
            parts.evaluator.close()
            await parts.redis.aclose()

    @staticmethod
    async def _until_agents_left(redis: Any, keys: Keys) -> None:
        """Keep Redis up until the agents have seen the run end and unregistered (they look
        every 0.5 s), within AGENTS_LEAVE_S. An embedded Redis stops with the coordinator,
        and an agent that missed the end would then retry for --redis-outage-s."""
        registry = Registry(redis, keys)
        while await registry.alive(await registry.clients()):  # noqa: ASYNC110 - Redis, polled
            await asyncio.sleep(0.1)

    def _summary(self, wall_s: float) -> RunOutcome:
        return RunOutcome(
            run_id=self.settings.run_id, status=self.status.state, wall_s=wall_s,
            slots=[s.as_dict() for s in self.status.slots.values()],
            rejected=dict(self.status.rejected), events_path=str(self.settings.events_path),
            http_url=self._http.url)
