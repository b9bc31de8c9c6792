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
import random
import time
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from bus import handoff as local_handoff
from bus.blobs import BlobStore
from bus.connection import connect, wait_ready
from bus.keys import Keys
from bus.registry import Registry, set_active_run
from coordinator import gradient
from coordinator.checkpoints import CheckpointStore, json_safe
from coordinator.clients import ClientTracker
from coordinator.context import RunContext
from coordinator.evaluation import Evaluator
from coordinator.gradient.runner import GradientSlotRunner
from coordinator.http import StatusServer
from coordinator.job_table import JobTable
from coordinator.leases import LeaseBroker
from coordinator.local_agents import AgentAccess, LocalAgents
from coordinator.models import PublishedModels
from coordinator.observability import LatestModel, Observability
from coordinator.population import pbt
from coordinator.population.config import SlotConfig, run_configs
from coordinator.population.final import run_final_merge
from coordinator.population.hooks import Population
from coordinator.progress import Progress
from coordinator.results.dispatcher import ResultDispatcher
from coordinator.results.validation import Rejections, ResultValidator
from coordinator.run_state import RunState
from coordinator.scheduling import ClientPool
from coordinator.security import job_bytes
from coordinator.settings import CoordinatorSecrets, CoordinatorSettings
from coordinator.slot import SlotRunner
from coordinator.status import RunStatus, SlotStatus
from coordinator.strategies import make_strategy
from serialization import decode
from serialization.tasks import load_task

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
        self._show_progress = show_progress
        self.observability = Observability(
            self.status, self._status_json, models=self._latest_model,
            checkpoints=lambda: self.ctx.run_state.store if self.ctx else None)
        self._http = StatusServer(self._status_json, settings.http_host, settings.http_port,
                                  token=self._secrets.api_token, on_stop=self.request_stop,
                                  observability=self.observability)
        self._agents: LocalAgents | None = None
        self._run_open = asyncio.Event()
        self._task: asyncio.Task[Any] | None = None
        self.stop_requested = False
        self.ctx: RunContext | None = None
        self.configs: dict[int, SlotConfig] = run_configs(
            settings, (resume_state or {}).get("slot_configs"))
        self.population: Population | None = None
        self._runners: dict[int, SlotRunner | GradientSlotRunner] = {}
        self._handoff: local_handoff.HostHandoff | None = None
        self._orphans = 0  # shared-memory segments of dead processes removed at start-up

    def _status_json(self) -> dict[str, Any]:
        leases = self.ctx.broker.pool.leases if self.ctx else {}
        return self.status.as_dict(leases)

    def _latest_model(self, slot_id: int) -> LatestModel | None:
        runner = self._runners.get(slot_id)
        return None if runner is None else LatestModel(*runner.latest_model())

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
            await self._startup()
            await self._main()
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

    async def _startup(self) -> None:
        s = self.settings
        torch.set_num_threads(max(1, s.eval_threads))
        redis = connect(s.redis_settings(self._secrets.redis_password))
        await wait_ready(redis)
        keys = Keys(s.run_id)
        task = await asyncio.to_thread(load_task, s.task, s.full_task_options())
        evaluator = Evaluator(task, nice=s.evaluation_nice)
        caps = {i: c.clients_per_round for i, c in self.configs.items()}
        pool = ClientPool(s.policy, clients_per_round=max(caps.values()),
                          min_clients=s.min_clients, rng=random.Random(s.seed),
                          prefer_unused=s.client_choice == "least-used", slot_caps=caps)
        states = await asyncio.to_thread(self._initial_states, evaluator)
        blobs = BlobStore(redis, keys, ttl_ms=s.blob_ttl_ms)
        self._handoff = await asyncio.to_thread(self._open_handoff)
        jobs = JobTable()
        validator = ResultValidator(
            run_id=s.run_id, jobs=jobs, known_clients=self.status.clients,
            results_stream=keys.results, schema=evaluator.schema(states[0][0]),
            max_update_bytes=s.max_update_bytes, verify_digests=s.verify_digests,
            keyring=self._secrets.keyring, late_policy=s.late_policy)
        self.ctx = RunContext(
            settings=s, redis=redis, keys=keys, blobs=blobs, broker=LeaseBroker(pool),
            evaluator=evaluator,
            run_state=RunState(CheckpointStore(s.run_dir, s.keep_checkpoints), redis, keys),
            status=self.status, jobs=jobs, validator=validator,
            rejections=Rejections(self.status), models=PublishedModels(blobs, self._handoff),
            job_bytes=functools.partial(job_bytes, keyring=self._secrets.keyring),
            handoff=self._handoff)
        self._make_runners(states)
        await self._announce()

    def _open_handoff(self) -> local_handoff.HostHandoff | None:
        """Blocking: the shared-memory handoff for agents on this host (None: off, or no
        /dev/shm here). Segments a killed coordinator or agent left behind go first."""
        if not self.settings.local_handoff or not local_handoff.available():
            return None
        self._orphans = len(local_handoff.sweep_orphans())  # logged after run_started
        try:
            return local_handoff.HostHandoff()
        except OSError as exc:
            log.warning("handoff_unavailable", error=str(exc))
            return None

    def _initial_states(self, evaluator: Evaluator) -> list[tuple[dict[str, torch.Tensor], int]]:
        """Per slot: (model state, first round to run): from seeds, or from checkpoints."""
        done = {int(k): v for k, v in (self._resume or {}).get("slots", {}).items()}
        states = []
        for slot_id in range(self.settings.slots):
            if slot_id in done:
                payload = open(done[slot_id]["path"], "rb").read()  # noqa: SIM115
                state = {k: v.clone() for k, v in decode(payload)[0].items()}
                states.append((state, int(done[slot_id]["round"]) + 1))
            else:
                seed = self.settings.seed if self.settings.shared_init else (
                    self.configs[slot_id].seed)
                states.append((evaluator.initial_state(seed), 1))
        return states

    def _make_runners(self, states: list[tuple[dict[str, torch.Tensor], int]]) -> None:
        assert self.ctx is not None
        s = self.settings
        for slot_id, (state, first_round) in enumerate(states):
            config = self.configs[slot_id]
            self.status.slots[slot_id] = SlotStatus(slot_id, s.rounds, round=first_round,
                                                   rounds_done=first_round - 1,
                                                   config=config.flat())
            runner: SlotRunner | GradientSlotRunner
            if s.is_gradient_slot(slot_id):
                runner = gradient.make_runner(self.ctx, slot_id, state, first_round)
            else:
                strategy = make_strategy(config.strategy, **config.strategy_options)
                self._restore_strategy(slot_id, first_round - 1, strategy)
                runner = SlotRunner(self.ctx, slot_id, strategy, state, first_round,
                                    config=config)
            self._runners[slot_id] = runner
            self.ctx.inboxes.add(slot_id, runner)
        self.population = self._population()

    def _population(self) -> Population | None:
        """The round-boundary hook of PBT and periodic merges, attached to every slot."""
        assert self.ctx is not None
        s, ctx = self.settings, self.ctx
        if s.population != "pbt" and s.merge != "every":
            return None
        pbt_settings = (pbt.PbtSettings(every=s.pbt_every, fraction=s.pbt_fraction)
                        if s.population == "pbt" else None)
        weight_slots = {i: r for i, r in self._runners.items() if isinstance(r, SlotRunner)}
        population = Population(
            slots=weight_slots, last_round=s.rounds, pbt_settings=pbt_settings,
            bounds={k: (float(v[0]), float(v[1])) for k, v in s.explore_bounds.items()},
            merge_every=s.merge_every if s.merge == "every" else 0,
            evaluate=lambda state: ctx.evaluator.evaluate_queued(-1, state),
            rng=random.Random(f"{s.seed}:population:{len(s.slot_overrides)}"))
        for runner in weight_slots.values():
            runner.population = population
        return population

    def _restore_strategy(self, slot_id: int, round_: int, strategy: Any) -> None:
        assert self.ctx is not None
        path = self.ctx.run_state.store.model_path(slot_id, round_, "strategy")
        if round_ > 0 and path.exists():
            state = decode(path.read_bytes())[0]
            strategy.load_state_dict({k: v.clone() for k, v in state.items()})

    async def _announce(self) -> None:
        assert self.ctx is not None
        s, ctx = self.settings, self.ctx
        await ctx.run_state.announce(self._state_doc())
        await set_active_run(ctx.redis, s.run_id)
        advert = self._handoff.advert if self._handoff is not None else None
        await ctx.redis.hset(ctx.keys.state(), mapping={
            "status": "running", "slots": s.slots, "rounds": s.rounds,
            # Agents check these before registering: those on this host say so.
            "handoff": advert.name if advert else "",
            "handoff_digest": advert.digest if advert else ""})
        model_nbytes = sum(t.numel() * t.element_size() for t in self._runners[0].state.values())
        event = "run_resumed" if self._resume else "run_started"
        log.info(event, slots=s.slots, rounds=s.rounds, expected_clients=s.expected_clients,
                 policy=s.policy, client_choice=s.client_choice, quorum=s.quorum,
                 min_clients=s.min_clients,
                 clients_per_round=s.round_size, deadline_s=s.deadline_s,
                 late_policy=s.late_policy, strategy=s.strategy, task=s.task,
                 model_nbytes=model_nbytes, seed=s.seed, mode=s.mode,
                 gradient_slots=[i for i in self._runners if s.is_gradient_slot(i)],
                 signing=self._secrets.keyring is not None,
                 slot_configs=[self.configs[i].flat() for i in sorted(self.configs)],
                 population=s.population, merge=s.merge, merge_every=s.merge_every,
                 shared_init=s.shared_init, local_handoff=self._handoff is not None,
                 rounds_done={i: r.first_round - 1 for i, r in self._runners.items()})
        if self._orphans:
            log.warning("shm_orphans_removed", segments=self._orphans)
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

    async def _main(self) -> None:
        assert self.ctx is not None
        ctx = self.ctx
        registry = Registry(ctx.redis, ctx.keys, ttl_ms=self.settings.heartbeat_ttl_ms,
                            on_undecodable=lambda _c, _e: self.status.reject("bad_registration"))
        tracker = ClientTracker(ctx, registry)
        progress = Progress(self.status, live=self._show_progress)
        await tracker.poll()  # clients known before any result is judged (a resumed run's)
        async with asyncio.TaskGroup() as services:
            service_tasks = [services.create_task(tracker.run(), name="client-tracker"),
                             services.create_task(self._dispatcher(ctx).run(), name="results"),
                             services.create_task(progress.run(), name="progress")]
            try:
                if await self._start_local_agents():
                    assert self._agents is not None
                    service_tasks.append(services.create_task(
                        self._agents.watch(self._run_open), name="local-agents"))
                await self._wait_for_clients(tracker)
                async with asyncio.TaskGroup() as slots:
                    for runner in self._runners.values():
                        slots.create_task(runner.run(), name=f"slot-{runner.slot_id}")
                await self._after_slots()
            finally:
                for task in service_tasks:
                    task.cancel()

    async def _after_slots(self) -> None:
        """Merged models' evaluations finish; `--merge final` picks the run's result."""
        assert self.ctx is not None
        ctx = self.ctx
        if self.population is not None:
            await self.population.wait_evaluations()
        if self.settings.merge == "final":
            slots = {i: (r.state, self.status.slots[i].last_accuracy or 0.0)
                     for i, r in self._runners.items()}
            await run_final_merge(slots, lambda state: ctx.evaluator.evaluate_queued(-1, state),
                                  ctx.run_state.store)

    @staticmethod
    def _dispatcher(ctx: RunContext) -> ResultDispatcher:
        return ResultDispatcher(redis=ctx.redis, keys=ctx.keys, slots=ctx.settings.slots,
                                validator=ctx.validator, rejections=ctx.rejections,
                                leases=ctx.broker, inboxes=ctx.inboxes)

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

    async def _wait_for_clients(self, tracker: ClientTracker) -> None:
        assert self.ctx is not None
        self.status.state = "waiting for clients"
        expected = self.settings.expected_clients
        try:
            async with asyncio.timeout(self.settings.wait_clients_s):
                await tracker.wait_for(expected)
        except TimeoutError:
            log.warning("clients_missing", expected=expected, alive=len(tracker.live))
        self.status.state = "running"
        self._run_open.set()
        self.ctx.broker.open()

    # --- shutdown -------------------------------------------------------------------------

    async def _shutdown(self, wall_s: float) -> None:
        log.info("run_finished", wall_s=round(wall_s, 6), status=self.status.state)
        if self.ctx is not None:
            try:  # bounded: a run that gave up on Redis must not wait for it again
                async with asyncio.timeout(SHUTDOWN_WRITE_S):
                    await self.ctx.redis.hset(self.ctx.keys.state(), "status", self.status.state)
            except Exception as exc:  # noqa: BLE001 - shutdown goes on whatever Redis says
                log.warning("state_write_failed", error=str(exc) or type(exc).__name__)
            else:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(AGENTS_LEAVE_S):
                        await self._until_agents_left(self.ctx.redis, self.ctx.keys)
        if self._agents is not None:
            await self._agents.stop()
        await self._http.stop()
        if self._handoff is not None:  # after the agents: nothing reads a segment any more
            await asyncio.to_thread(self._handoff.close)
        self.observability.detach()
        if self.ctx is not None:
            self.ctx.evaluator.close()
            await self.ctx.redis.aclose()

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
