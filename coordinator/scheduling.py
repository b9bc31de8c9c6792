"""The client pool: which clients are idle, which slot holds each lease, who waits.

A lease ties one client to one slot while that client trains for it. A client holds
at most one lease at any instant, which is what keeps the client sets of the slots
disjoint (the seed's S / S' split, generalised to N slots). Slots that want clients
for their next round wait; `assign` hands idle clients to waiting slots by a policy:

- ``partition``: the idle clients, shuffled, are split as evenly as possible among
  the waiting slots (longest-waiting slots first when not all can be served);
- ``greedy``: the longest-waiting slot takes the longest-idle clients, then the next.

With ``prefer_unused`` (the default), whenever a slot can choose among more idle
clients than it takes, it takes those it has trained with least so far, keeping
the policy's order among equals. When every client is leased all the time (slots
x clients per round = clients) a slot otherwise tends to get its own clients
back round after round and never sees the others' data; overlaps of rounds give
it choices, and this spends them on coverage at no cost in idle time.

Measured (bench.payoff, 3 slots of 2 clients, 16 rounds), those choices are rare:
a slot leased exactly its previous round's clients again in 63-83% of its rounds,
so each slot trained on a third of the (non-IID) partitions for long stretches.
With ``rotate`` a waiting slot whose only idle candidates are its own previous
round's clients defers while another slot holds a lease (its clients come back
soon): it trades a short wait for a swap. A lone slot never defers.

The pool is bookkeeping only: time comes in as ``now`` and randomness from an
injected ``random.Random``, so the coordinator's async loop and the replay tool's
what-if simulator drive the same code and get the same decisions.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

POLICIES = ("partition", "greedy")


@dataclass(frozen=True)
class Assignment:
    """The clients one `assign` call leased to one slot."""

    slot_id: int
    client_ids: tuple[str, ...]


def split_sizes(num_clients: int, num_slots: int, cap: int, minimum: int) -> list[int]:
    """Part sizes of an even split of `num_clients` among as many of `num_slots` as can
    each get at least `minimum` (and at most `cap`); the first parts take the remainder."""
    served = min(num_slots, num_clients // minimum)
    if served <= 0:
        return []
    total = min(num_clients, served * cap)
    base, extra = divmod(total, served)
    return [base + (1 if i < extra else 0) for i in range(served)]


class ClientPool:
    """Idle clients, leases (client -> slot) and waiting slots, with an assignment policy."""

    def __init__(
        self,
        policy: str,
        *,
        clients_per_round: int,
        min_clients: int = 1,
        rng: random.Random | None = None,
        prefer_unused: bool = True,
        slot_caps: Mapping[int, int] | None = None,
        rotate: bool = False,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
        if min_clients < 1:
            raise ValueError(f"min_clients must be at least 1, got {min_clients}")
        if clients_per_round < min_clients:
            raise ValueError(
                f"clients_per_round ({clients_per_round}) must be at least "
                f"min_clients ({min_clients})"
            )
        self.policy = policy
        self.clients_per_round = clients_per_round
        self.min_clients = min_clients
        self._rng = rng if rng is not None else random.Random()
        self._idle_since: dict[str, float] = {}
        self._leases: dict[str, int] = {}
        # slot -> (waiting since, arrival number): FIFO among slots that wait from the same time
        self._waiting_since: dict[int, tuple[float, int]] = {}
        self._retired: set[int] = set()
        self._arrivals = itertools.count()
        self.prefer_unused = prefer_unused
        self.rotate = rotate
        self._last: dict[int, frozenset[str]] = {}  # slot -> the clients of its last lease
        self._uses: Counter[tuple[int, str]] = Counter()  # (slot, client) -> rounds together
        # per-slot clients per round (a slot configured apart); others take clients_per_round
        self.slot_caps = dict(slot_caps or {})

    def cap(self, slot_id: int) -> int:
        """Most clients `slot_id` takes for one round."""
        return max(self.min_clients, min(self.slot_caps.get(slot_id, self.clients_per_round),
                                         self.clients_per_round))

    # -- clients -------------------------------------------------------------------

    def add_client(self, client_id: str, now: float) -> None:
        """A client registered (or heartbeats again): idle from `now`; no-op if known."""
        if client_id not in self._idle_since and client_id not in self._leases:
            self._idle_since[client_id] = now

    def remove_client(self, client_id: str) -> int | None:
        """A client is lost: forget it; returns the slot that held its lease, if any."""
        self._idle_since.pop(client_id, None)
        return self._leases.pop(client_id, None)

    def release(self, client_id: str, now: float, *, slot_id: int | None = None) -> int | None:
        """Return a client's lease (idle from `now`); returns the slot it was leased to.

        None, and nothing changes, when the client holds no lease, or when `slot_id` is
        given and the lease belongs to another slot (a stale release).
        """
        holder = self._leases.get(client_id)
        if holder is None or (slot_id is not None and holder != slot_id):
            return None
        del self._leases[client_id]
        self._idle_since[client_id] = now
        return holder

    def lease_of(self, client_id: str) -> int | None:
        """The slot the client is leased to, or None."""
        return self._leases.get(client_id)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._idle_since or client_id in self._leases

    def __len__(self) -> int:
        return len(self._idle_since) + len(self._leases)

    # -- slots ---------------------------------------------------------------------

    def slot_waiting(self, slot_id: int, now: float) -> None:
        """The slot wants clients for its next round (no-op if it already waits)."""
        if slot_id in self._retired:
            raise ValueError(f"slot {slot_id} is retired")
        if slot_id not in self._waiting_since:
            self._waiting_since[slot_id] = (now, next(self._arrivals))

    def slot_cancelled(self, slot_id: int) -> None:
        """The slot no longer waits (its wait was cancelled); no-op if it was not waiting."""
        self._waiting_since.pop(slot_id, None)

    def slot_retired(self, slot_id: int) -> None:
        """The slot finished all its rounds: it stops waiting and never waits again.

        Leases it still holds stay until `release` or `remove_client`: those clients
        are still busy with its jobs.
        """
        self._waiting_since.pop(slot_id, None)
        self._retired.add(slot_id)

    # -- views ---------------------------------------------------------------------

    @property
    def idle(self) -> list[str]:
        """Idle clients, longest-idle first (ties by id)."""
        return sorted(self._idle_since, key=lambda c: (self._idle_since[c], c))

    @property
    def leases(self) -> dict[str, int]:
        """A copy of client -> slot for every leased client."""
        return dict(self._leases)

    @property
    def waiting(self) -> list[int]:
        """Waiting slots, longest-waiting first."""
        return sorted(self._waiting_since, key=self._waiting_since.__getitem__)

    # -- assignment ----------------------------------------------------------------

    def assign(self, now: float) -> list[Assignment]:
        """Lease idle clients to waiting slots by the policy; an assigned slot stops waiting.

        Slots that get nothing keep waiting. `now` is accepted for symmetry with the
        other calls (the decision depends only on the recorded times).
        """
        slots = [s for s in self.waiting if not (self.rotate and self._defers(s))]
        if not slots or not self._idle_since:
            return []
        if self.policy == "partition":
            plan = self._plan_partition(slots)
        else:
            plan = self._plan_greedy(slots)
        for assignment in plan:
            self._take(assignment)
        return plan

    def _defers(self, slot_id: int) -> bool:
        """With `rotate`: every idle client was in the slot's last lease, and another slot
        holds a lease (a swap is coming)."""
        last = self._last.get(slot_id)
        if not last or any(c not in last for c in self._idle_since):
            return False
        return any(holder != slot_id for holder in self._leases.values())

    def _plan_partition(self, slots: Sequence[int]) -> list[Assignment]:
        sizes = split_sizes(
            len(self._idle_since), len(slots), self.clients_per_round, self.min_clients
        )
        if not sizes:
            return []
        clients = sorted(self._idle_since)  # a fixed order, so the seeded shuffle reproduces
        self._rng.shuffle(clients)
        plan = []
        for slot_id, size in zip(slots, sizes, strict=False):
            taken, clients = self._choose(slot_id, clients, min(size, self.cap(slot_id)))
            plan.append(Assignment(slot_id, taken))
        return plan

    def _plan_greedy(self, slots: Sequence[int]) -> list[Assignment]:
        queue = self.idle
        plan = []
        for slot_id in slots:
            if len(queue) < self.min_clients:
                break
            taken, queue = self._choose(slot_id, queue, self.cap(slot_id))
            plan.append(Assignment(slot_id, taken))
        return plan

    def _choose(self, slot_id: int, ordered: list[str], size: int
                ) -> tuple[tuple[str, ...], list[str]]:
        """`size` clients for the slot from `ordered` (the policy's order) and the rest."""
        if self.prefer_unused:
            rank = {c: (self._uses[slot_id, c], i) for i, c in enumerate(ordered)}
            chosen = sorted(ordered, key=rank.__getitem__)[:size]
        else:
            chosen = ordered[:size]
        picked = set(chosen)
        return tuple(chosen), [c for c in ordered if c not in picked]

    def _take(self, assignment: Assignment) -> None:
        for client_id in assignment.client_ids:
            del self._idle_since[client_id]
            self._leases[client_id] = assignment.slot_id
            self._uses[assignment.slot_id, client_id] += 1
        self._last[assignment.slot_id] = frozenset(assignment.client_ids)
        del self._waiting_since[assignment.slot_id]
