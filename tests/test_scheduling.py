"""The client pool: leases, waiting slots, and the partition and greedy policies."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.scheduling import POLICIES, Assignment, ClientPool, split_sizes


def pool_with(
    policy: str, clients: int, *, per_round: int = 10, minimum: int = 1, seed: int = 0
) -> ClientPool:
    pool = ClientPool(
        policy, clients_per_round=per_round, min_clients=minimum, rng=random.Random(seed)
    )
    for i in range(clients):
        pool.add_client(f"c{i}", now=float(i))
    return pool


@pytest.mark.parametrize(
    ("policy", "per_round", "minimum"),
    [("fifo", 2, 1), ("greedy", 2, 0), ("partition", 1, 2), ("greedy", 0, 1)],
)
def test_rejects_unknown_policy_and_bad_numbers(policy: str, per_round: int, minimum: int) -> None:
    """An unknown policy, min_clients < 1 or clients_per_round < min_clients is refused."""
    with pytest.raises(ValueError):  # noqa: PT011 -- the message is checked elsewhere
        ClientPool(policy, clients_per_round=per_round, min_clients=minimum)


def test_unknown_policy_message_lists_choices() -> None:
    """The error for an unknown policy names the valid ones."""
    with pytest.raises(ValueError, match="partition, greedy"):
        ClientPool("fifo", clients_per_round=1)


def test_add_client_is_idempotent_and_keeps_idle_since() -> None:
    """Adding a known client again changes nothing, even its idle-since time."""
    pool = pool_with("greedy", 0)
    pool.add_client("b", now=5.0)
    pool.add_client("a", now=5.0)
    pool.add_client("c", now=1.0)
    pool.add_client("c", now=9.0)
    assert pool.idle == ["c", "a", "b"]
    assert len(pool) == 3
    assert "a" in pool


def test_split_sizes_even_capped_and_minimum() -> None:
    """Parts are even (remainder first), capped, and as many slots as the minimum allows."""
    assert split_sizes(7, 3, cap=10, minimum=1) == [3, 2, 2]
    assert split_sizes(10, 2, cap=3, minimum=1) == [3, 3]
    assert split_sizes(5, 3, cap=10, minimum=2) == [3, 2]
    assert split_sizes(1, 3, cap=10, minimum=2) == []


def test_partition_splits_all_idle_clients_evenly_and_disjointly() -> None:
    """Seven idle clients among three waiting slots: parts of 3, 2 and 2, disjoint."""
    pool = pool_with("partition", 7)
    for slot in (0, 1, 2):
        pool.slot_waiting(slot, now=10.0 + slot)
    plan = pool.assign(now=20.0)
    assert [a.slot_id for a in plan] == [0, 1, 2]
    assert [len(a.client_ids) for a in plan] == [3, 2, 2]
    leased = [c for a in plan for c in a.client_ids]
    assert sorted(leased) == sorted(f"c{i}" for i in range(7))
    assert pool.idle == []
    assert pool.waiting == []


def test_partition_caps_each_part_at_clients_per_round() -> None:
    """With a cap of 3, two slots take six of ten clients; four stay idle."""
    pool = pool_with("partition", 10, per_round=3)
    pool.slot_waiting(0, now=0.0)
    pool.slot_waiting(1, now=0.0)
    plan = pool.assign(now=1.0)
    assert [len(a.client_ids) for a in plan] == [3, 3]
    assert len(pool.idle) == 4


def test_partition_is_random_but_reproducible_with_a_seed() -> None:
    """The same seed gives the same split; different seeds give different splits."""

    def split(seed: int) -> list[Assignment]:
        pool = pool_with("partition", 12, seed=seed)
        pool.slot_waiting(0, now=0.0)
        pool.slot_waiting(1, now=0.0)
        return pool.assign(now=1.0)

    assert split(3) == split(3)
    assert len({tuple(split(seed)) for seed in range(6)}) > 1


def test_partition_skips_slots_below_min_clients_and_gives_their_share_to_others() -> None:
    """Five clients, min 2, three slots: the two longest-waiting take 3 and 2, one waits."""
    pool = pool_with("partition", 5, minimum=2)
    for slot, since in ((7, 1.0), (8, 3.0), (9, 2.0)):
        pool.slot_waiting(slot, now=since)
    plan = pool.assign(now=4.0)
    assert [(a.slot_id, len(a.client_ids)) for a in plan] == [(7, 3), (9, 2)]
    assert pool.waiting == [8]
    assert pool.idle == []


def test_nothing_assigned_below_min_clients() -> None:
    """One idle client and min_clients 2: no assignment, the slot keeps waiting."""
    for policy in POLICIES:
        pool = pool_with(policy, 1, minimum=2)
        pool.slot_waiting(0, now=0.0)
        assert pool.assign(now=1.0) == []
        assert pool.waiting == [0]
        assert pool.idle == ["c0"]


def test_greedy_serves_longest_waiting_slot_first() -> None:
    """Two idle clients, one per round: the slot that waited first gets the first one."""
    pool = pool_with("greedy", 2, per_round=1)
    pool.slot_waiting(5, now=2.0)
    pool.slot_waiting(3, now=1.0)
    plan = pool.assign(now=3.0)
    assert plan == [Assignment(3, ("c0",)), Assignment(5, ("c1",))]


def test_greedy_takes_longest_idle_clients_first_ties_by_id() -> None:
    """Clients idle since 1.0 (b, a) go before the one idle since 2.0; ties by id."""
    pool = ClientPool("greedy", clients_per_round=2)
    pool.add_client("z", now=2.0)
    pool.add_client("b", now=1.0)
    pool.add_client("a", now=1.0)
    pool.slot_waiting(0, now=0.0)
    assert pool.assign(now=3.0) == [Assignment(0, ("a", "b"))]
    assert pool.idle == ["z"]


def test_greedy_stops_when_fewer_than_min_clients_remain() -> None:
    """Five clients, three per round, min 3: the first slot is served, the second waits."""
    pool = pool_with("greedy", 5, per_round=3, minimum=3)
    pool.slot_waiting(0, now=0.0)
    pool.slot_waiting(1, now=1.0)
    plan = pool.assign(now=2.0)
    assert plan == [Assignment(0, ("c0", "c1", "c2"))]
    assert pool.waiting == [1]


def test_released_client_goes_to_the_back_of_the_greedy_queue() -> None:
    """A client released at t=10 is idle since 10, behind clients idle since earlier."""
    pool = pool_with("greedy", 3, per_round=1)
    pool.slot_waiting(0, now=0.0)
    assert pool.assign(now=1.0) == [Assignment(0, ("c0",))]
    assert pool.release("c0", now=10.0) == 0
    assert pool.idle == ["c1", "c2", "c0"]


def test_release_returns_the_slot_and_ignores_unleased_or_stale() -> None:
    """release gives the lease's slot; None for an idle or unknown client or another slot."""
    pool = pool_with("greedy", 2, per_round=1)
    pool.slot_waiting(4, now=0.0)
    pool.assign(now=1.0)
    assert pool.lease_of("c0") == 4
    assert pool.release("c1", now=2.0) is None
    assert pool.release("nobody", now=2.0) is None
    assert pool.release("c0", now=2.0, slot_id=5) is None
    assert pool.lease_of("c0") == 4
    assert pool.release("c0", now=2.0, slot_id=4) == 4
    assert pool.lease_of("c0") is None
    assert "nobody" not in pool


def test_remove_client_forgets_it_and_returns_its_lease() -> None:
    """A lost leased client is forgotten and its slot returned; an idle one just forgotten."""
    pool = pool_with("greedy", 2, per_round=1)
    pool.slot_waiting(1, now=0.0)
    pool.assign(now=1.0)
    assert pool.remove_client("c0") == 1
    assert pool.remove_client("c1") is None
    assert pool.remove_client("c1") is None
    assert len(pool) == 0
    assert pool.leases == {}


def test_waiting_is_idempotent_and_retired_slots_never_wait() -> None:
    """Waiting twice keeps the first time; a retired slot stops waiting and may not wait again."""
    pool = pool_with("greedy", 0)
    pool.slot_waiting(0, now=1.0)
    pool.slot_waiting(1, now=2.0)
    pool.slot_waiting(0, now=3.0)
    assert pool.waiting == [0, 1]
    pool.slot_retired(0)
    assert pool.waiting == [1]
    with pytest.raises(ValueError, match="retired"):
        pool.slot_waiting(0, now=4.0)


def test_cancelled_slot_stops_waiting_and_may_wait_again() -> None:
    """A cancelled wait removes the slot from the queue; waiting again starts a new wait."""
    pool = pool_with("greedy", 1)
    pool.slot_waiting(0, now=1.0)
    pool.slot_waiting(1, now=2.0)
    pool.slot_cancelled(0)
    pool.slot_cancelled(0)
    assert pool.waiting == [1]
    pool.slot_waiting(0, now=3.0)
    assert pool.assign(now=4.0) == [Assignment(1, ("c0",))]
    assert pool.waiting == [0]


def test_retired_slot_keeps_its_leases_until_released() -> None:
    """A retired slot's clients stay leased (they are still busy) until released."""
    pool = pool_with("greedy", 1)
    pool.slot_waiting(0, now=0.0)
    pool.assign(now=1.0)
    pool.slot_retired(0)
    assert pool.leases == {"c0": 0}
    assert pool.release("c0", now=2.0) == 0


CLIENTS = [f"c{i}" for i in range(8)]
# Listed more than once: common operations, so random runs assign often.
OP_NAMES = ["add"] * 3 + ["wait"] * 3 + ["assign"] * 2 + ["release"] * 2
OP_NAMES += ["remove", "retire", "cancel"]
OPS = st.tuples(st.sampled_from(OP_NAMES), st.integers(0, len(CLIENTS) - 1))


class PoolModel:
    """Drives a pool with random operations and checks the lease invariant after each."""

    def __init__(self, pool: ClientPool) -> None:
        self.pool = pool
        self.known: set[str] = set()
        self.retired: set[int] = set()

    def apply(self, op: str, index: int, now: float) -> None:
        arg: str | int = CLIENTS[index] if op in ("add", "remove", "release") else index % 4
        if op == "add":
            self.pool.add_client(str(arg), now)
            self.known.add(str(arg))
        elif op == "remove":
            self.pool.remove_client(str(arg))
            self.known.discard(str(arg))
        elif op == "release":
            self.pool.release(str(arg), now)
        elif op == "wait" and arg not in self.retired:
            self.pool.slot_waiting(int(arg), now)
        elif op == "cancel":
            self.pool.slot_cancelled(int(arg))
        elif op == "retire":
            self.pool.slot_retired(int(arg))
            self.retired.add(int(arg))
        elif op == "assign":
            self.check_assign(now)
        self.check_state()

    def check_assign(self, now: float) -> None:
        leased_before = self.pool.leases
        idle_before = set(self.pool.idle)
        waiting_before = set(self.pool.waiting)
        plan = self.pool.assign(now)
        taken = [c for a in plan for c in a.client_ids]
        assert len(taken) == len(set(taken))
        assert set(taken) <= idle_before
        assert not set(taken) & set(leased_before)
        assert len({a.slot_id for a in plan}) == len(plan)
        for a in plan:
            assert a.slot_id in waiting_before
            assert self.pool.min_clients <= len(a.client_ids) <= self.pool.clients_per_round
            assert a.slot_id not in self.pool.waiting
        if self.pool.waiting:  # work-conserving: a slot waits only when too few are idle
            assert len(self.pool.idle) < self.pool.min_clients

    def check_state(self) -> None:
        leases, idle = self.pool.leases, self.pool.idle
        assert not set(leases) & set(idle)
        assert set(leases) | set(idle) == self.known
        assert len(idle) == len(set(idle))
        assert not set(self.pool.waiting) & self.retired


@settings(max_examples=150, deadline=None)
@given(
    policy=st.sampled_from(POLICIES),
    per_round=st.integers(1, 4),
    minimum=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    ops=st.lists(OPS, min_size=20, max_size=80),
)
def test_lease_invariant_holds_under_random_operations(
    policy: str, per_round: int, minimum: int, seed: int, ops: list[tuple[str, int]]
) -> None:
    """No client is leased twice, leases are of known clients, assignments stay in bounds."""
    minimum = min(minimum, per_round)
    model = PoolModel(
        ClientPool(
            policy, clients_per_round=per_round, min_clients=minimum, rng=random.Random(seed)
        )
    )
    for step, (op, arg) in enumerate(ops):
        model.apply(op, arg, now=float(step))



def _pool_after_one_round(prefer_unused: bool) -> ClientPool:
    """Slot 0 trained with a and b (the longest idle); they are back before c and d idle."""
    pool = ClientPool("greedy", clients_per_round=2, prefer_unused=prefer_unused)
    for client, since in (("a", 0.0), ("b", 1.0), ("c", 10.0), ("d", 11.0)):
        pool.add_client(client, now=since)
    pool.slot_waiting(0, now=0.0)
    assert pool.assign(now=0.0) == [Assignment(0, ("a", "b"))]
    pool.release("a", now=5.0)
    pool.release("b", now=6.0)
    pool.slot_waiting(0, now=12.0)
    return pool


def test_slot_prefers_clients_it_has_used_least() -> None:
    """Given a choice, a slot takes clients it never trained with over its usual ones."""
    pool = _pool_after_one_round(prefer_unused=True)
    assert pool.assign(now=12.0) == [Assignment(0, ("c", "d"))]


def test_policy_order_kept_without_the_preference() -> None:
    """With prefer_unused off, greedy takes the longest-idle clients whatever the history."""
    pool = _pool_after_one_round(prefer_unused=False)
    assert pool.assign(now=12.0) == [Assignment(0, ("a", "b"))]


def _staggered_rounds(pool: ClientPool, rounds: int) -> dict[int, list[frozenset[str]]]:
    """3 slots of 2 clients on 6 clients, finishing in turn (slot 0, 1, 2, 0, ...): each slot
    releases its clients and waits for its next round; what each slot leased, in order."""
    for c in "012345":
        pool.add_client(c, 0.0)
    leased: dict[int, list[frozenset[str]]] = {0: [], 1: [], 2: []}
    now = 0.0
    for slot in (0, 1, 2):
        pool.slot_waiting(slot, now)
    for a in pool.assign(now):
        leased[a.slot_id].append(frozenset(a.client_ids))
    for step in range(3 * rounds):
        slot, now = step % 3, now + 1.0
        for client in leased[slot][-1]:
            pool.release(client, now, slot_id=slot)
        pool.slot_waiting(slot, now)
        for a in pool.assign(now):
            leased[a.slot_id].append(frozenset(a.client_ids))
    return leased


def _repeats(leased: dict[int, list[frozenset[str]]]) -> int:
    return sum(a == b for rounds in leased.values() for a, b in itertools.pairwise(rounds))


def test_without_rotation_staggered_slots_keep_their_clients() -> None:
    """The measured degeneration: slots that finish in turn find only their own clients idle
    and lease them again every round (least-used has nothing to choose from)."""
    leased = _staggered_rounds(ClientPool("partition", clients_per_round=2,
                                          rng=random.Random(0)), rounds=6)
    assert _repeats(leased) == sum(len(r) - 1 for r in leased.values())


def test_rotation_swaps_clients_between_slots_and_keeps_them_disjoint() -> None:
    """With rotate, a slot whose only idle candidates are its own last clients waits while
    another slot holds a lease; the next release swaps them: no slot leases the same pair
    twice in a row, leases stay disjoint, and no client stays idle once two slots wait."""
    pool = ClientPool("partition", clients_per_round=2, rng=random.Random(0), rotate=True)
    leased = _staggered_rounds(pool, rounds=6)
    assert _repeats(leased) == 0
    assert all(len(rounds) >= 4 for rounds in leased.values())
    assert len(set(pool.leases)) == len(pool.leases)


def test_a_lone_slot_never_defers() -> None:
    """One slot (or the last one running): nobody else holds a lease, so it takes its own
    clients back at once."""
    pool = ClientPool("partition", clients_per_round=2, rotate=True)
    for c in "01":
        pool.add_client(c, 0.0)
    for round_ in range(3):
        pool.slot_waiting(0, float(round_))
        (assignment,) = pool.assign(float(round_))
        for c in assignment.client_ids:
            pool.release(c, float(round_), slot_id=0)
