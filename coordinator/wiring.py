"""Start-up's assembly: the run's parts, each handed the few collaborators it uses.

`build` connects to Redis, loads the task, builds (or restores) each slot's model
and wires the services around them: the lease broker, the client tracker, the
result dispatcher, the model and job publishers, the result sink, the slots and,
with PBT or periodic merges, the population. What it returns is only what the
coordinator's main loop and shutdown need; no part receives it.
"""

from __future__ import annotations

import asyncio
import functools
import random
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
import torch

from bus import handoff as local_handoff
from bus.blobs import BlobStore
from bus.connection import connect, wait_ready
from bus.keys import Keys
from bus.registry import Registry
from coordinator.checkpoints import CheckpointStore
from coordinator.clients import ClientTracker
from coordinator.evaluation import Evaluator
from coordinator.job_table import JobTable
from coordinator.leases import LeaseBroker
from coordinator.population import pbt
from coordinator.population.config import SlotConfig
from coordinator.population.hooks import Population
from coordinator.results.dispatcher import ResultDispatcher
from coordinator.results.sink import ResultSink
from coordinator.results.validation import ResultValidator
from coordinator.run_state import RunState
from coordinator.scheduling import ClientPool
from coordinator.security import job_bytes
from coordinator.settings import CoordinatorSecrets, CoordinatorSettings
from coordinator.slots.factory import PopulationMember, SlotBuilder
from coordinator.slots.lifecycle import Slot
from coordinator.slots.publishing import JobPublisher, ModelPublisher
from coordinator.slots.registry import Slots
from coordinator.slots.scoring import FederatedScorer
from coordinator.status import RunStatus, SlotStatus
from coordinator.strategies import make_strategy
from serialization import decode
from serialization.tasks import load_task

log = structlog.get_logger()
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RunParts:
    """What start-up built, for the main loop and shutdown."""

    redis: aioredis.Redis
    keys: Keys
    evaluator: Evaluator
    run_state: RunState
    leases: LeaseBroker
    tracker: ClientTracker
    dispatcher: ResultDispatcher
    slots: Slots
    population: Population | None
    scorer: FederatedScorer | None  # --merge final's candidates, scored on the clients
    handoff: local_handoff.HostHandoff | None
    orphans: int  # shared-memory segments of dead processes removed at start-up


async def build(settings: CoordinatorSettings, secrets: CoordinatorSecrets,
                configs: dict[int, SlotConfig], resume: dict[str, Any] | None,
                status: RunStatus) -> RunParts:
    s = settings
    torch.set_num_threads(max(1, s.eval_threads))
    redis = connect(s.redis_settings(secrets.redis_password))
    await wait_ready(redis)
    keys = Keys(s.run_id)
    task = await asyncio.to_thread(load_task, s.task, s.full_task_options())
    evaluator = Evaluator(task, nice=s.evaluation_nice)
    states = await asyncio.to_thread(initial_states, s, configs, resume, evaluator)
    handoff, orphans = await asyncio.to_thread(open_handoff, s)
    jobs = JobTable()
    slots = Slots(jobs, s.run_id)
    leases = LeaseBroker(client_pool(s, configs))
    registry = Registry(redis, keys, ttl_ms=s.heartbeat_ttl_ms,
                        on_undecodable=lambda _c, _e: status.reject("bad_registration"))
    validator = ResultValidator(
        run_id=s.run_id, jobs=jobs, known_clients=status.clients, results_stream=keys.results,
        schema=evaluator.schema(states[0][0]), max_update_bytes=s.max_update_bytes,
        verify_digests=s.verify_digests, keyring=secrets.keyring, late_policy=s.late_policy)
    tracker = ClientTracker(registry, leases=leases, slots=slots, status=status,
                            claims=validator.claims,
                            handoff_name=handoff.advert.name if handoff else None)
    results = ResultSink(redis, status, handoff)
    run_state = RunState(CheckpointStore(s.run_dir, s.keep_checkpoints), redis, keys)
    builder = SlotBuilder(
        settings=s, redis=redis, keys=keys, leases=leases, evaluator=evaluator,
        run_state=run_state, status=status,
        models=ModelPublisher(BlobStore(redis, keys, ttl_ms=s.blob_ttl_ms), handoff, tracker,
                              status),
        jobs=JobPublisher(redis, keys, s, jobs,
                          functools.partial(job_bytes, keyring=secrets.keyring), status),
        validator=validator, results=results)
    for slot_id, (state, first_round) in enumerate(states):
        slots.add(make_slot(builder, configs[slot_id], slot_id, state, first_round))
    scorer = None
    if s.merge == "final" and s.federated:  # scores the final candidates on the clients
        scorer = FederatedScorer(s.slots, clients=lambda: tracker.live, models=builder.models,
                                 jobs=builder.jobs, validator=validator, results=results,
                                 settings=s)
        slots.add_receiver(scorer)
    dispatcher = ResultDispatcher(redis=redis, keys=keys, slots=s.slots + (scorer is not None),
                                  validator=validator, results=results, leases=leases,
                                  slots_router=slots)
    return RunParts(redis, keys, evaluator, run_state, leases, tracker, dispatcher, slots,
                    population(s, slots), scorer, handoff, orphans)


def client_pool(s: CoordinatorSettings, configs: dict[int, SlotConfig]) -> ClientPool:
    caps = {i: c.clients_per_round for i, c in configs.items()}
    return ClientPool(s.policy, clients_per_round=max(caps.values()), min_clients=s.min_clients,
                      rng=random.Random(s.seed), prefer_unused=s.client_choice != "policy-order",
                      rotate=s.client_choice == "rotate",
                      slot_caps=caps)


def open_handoff(s: CoordinatorSettings) -> tuple[local_handoff.HostHandoff | None, int]:
    """Blocking: the shared-memory handoff for agents on this host (None: off, or no
    /dev/shm here), and how many segments a killed coordinator or agent left behind
    were removed first."""
    if not s.local_handoff or not local_handoff.available():
        return None, 0
    orphans = len(local_handoff.sweep_orphans())  # logged after run_started
    try:
        return local_handoff.HostHandoff(), orphans
    except OSError as exc:
        log.warning("handoff_unavailable", error=str(exc))
        return None, orphans


def initial_states(s: CoordinatorSettings, configs: dict[int, SlotConfig],
                   resume: dict[str, Any] | None, evaluator: Evaluator) -> list[tuple[State, int]]:
    """Blocking. Per slot: (model state, first round to run): from seeds, or checkpoints."""
    done = {int(k): v for k, v in (resume or {}).get("slots", {}).items()}
    states = []
    for slot_id in range(s.slots):
        if slot_id in done:
            payload = open(done[slot_id]["path"], "rb").read()  # noqa: SIM115
            state = {k: v.clone() for k, v in decode(payload)[0].items()}
            states.append((state, int(done[slot_id]["round"]) + 1))
        else:
            seed = s.seed if s.shared_init else configs[slot_id].seed
            states.append((evaluator.initial_state(seed), 1))
    return states


def make_slot(builder: SlotBuilder, config: SlotConfig, slot_id: int, state: State,
              first_round: int) -> Slot:
    s = builder.settings
    builder.status.slots[slot_id] = SlotStatus(slot_id, s.rounds, round=first_round,
                                               rounds_done=first_round - 1,
                                               config=config.flat())
    if s.is_gradient_slot(slot_id):
        return builder.gradient_slot(slot_id, state, first_round)
    strategy = make_strategy(config.strategy, **config.strategy_options)
    path = builder.run_state.store.model_path(slot_id, first_round - 1, "strategy")
    if first_round > 1 and path.exists():
        saved = decode(path.read_bytes())[0]
        strategy.load_state_dict({k: v.clone() for k, v in saved.items()})
    return builder.weight_slot(slot_id, state, first_round, config, strategy)


def population(s: CoordinatorSettings, slots: Slots) -> Population | None:
    """The round-boundary hook of PBT and periodic merges, attached to every weight slot."""
    if s.population != "pbt" and s.merge != "every":
        return None
    pbt_settings = (pbt.PbtSettings(every=s.pbt_every, fraction=s.pbt_fraction)
                    if s.population == "pbt" else None)
    members: dict[int, PopulationMember] = {}
    result = Population(
        slots=members, last_round=s.rounds, pbt_settings=pbt_settings,
        bounds={k: (float(v[0]), float(v[1])) for k, v in s.explore_bounds.items()},
        merge_every=s.merge_every if s.merge == "every" else 0,
        selected_on="validation" if s.federated else "test",
        rng=random.Random(f"{s.seed}:population:{len(s.slot_overrides)}"))
    for slot in slots:
        if not s.is_gradient_slot(slot.slot_id):
            members[slot.slot_id] = PopulationMember(slot, result)
            slot.hook = members[slot.slot_id]
    return result
