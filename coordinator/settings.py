"""The coordinator's settings: one frozen dataclass, built from the command line."""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bus.connection import DEFAULT_OUTAGE_S, RedisSettings
from bus.credentials import Keyring
from serialization.tasks import BUILTIN_TASKS

TASK_ALIASES = BUILTIN_TASKS
# Evaluation's nice steps when several slots share one machine's cores with the trainers
# (docs/default-job.md: 3 slots, trainers 1.5x faster than at 0, 8 of 30 rounds evaluated).
EVAL_NICE_SHARED = 10  # shared with the agents' default allowlist


def new_run_id() -> str:
    """Sortable and unique enough: UTC time plus a little randomness."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


@dataclass(frozen=True)
class TrainingSettings:
    """What every job asks of a client's local training."""

    # The default job: a step budget, so every client of a round does the same work
    # (whole epochs made each round wait on the biggest Dirichlet partition, 4x the
    # smallest). Chosen by simulation over partition seeds 0-2 (docs/default-job.md):
    # ~2,000 critical-path steps reach 85% whether jobs are 80 or 160 steps; batch 32
    # beat 16 at equal compute; lr 0.03 ended higher than 0.05 and 0.02; lr 0.1 or
    # batch 64 at lr 0.1 diverged; server momentum saved ~1 round in 8 (not adopted).
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    max_steps: int = 0
    local_steps: int = 80  # > 0: exactly this many steps per job; epochs and max_steps unused
    noop: bool = False

    def job_config(self, seed: int) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "seed": seed}


@dataclass(frozen=True)
class CoordinatorSettings:
    """Everything one run needs; saved with the run so `--resume` can rebuild it."""

    run_id: str
    slots: int = 3
    rounds: int = 20
    expected_clients: int = 6
    clients_per_round: int = 0  # 0: ceil(expected_clients / slots)
    min_clients: int = 1
    policy: str = "partition"
    client_choice: str = "least-used"  # or "policy-order"
    quorum: float = 1.0
    deadline_s: float = 600.0
    late_policy: str = "drop"
    staleness: str = "inverse"
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    task: str = TASK_ALIASES["fashion_mnist"]
    task_options: dict[str, Any] = field(default_factory=dict)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    seed: int = 0
    redis_url: str | None = None
    redis_username: str | None = None
    redis_ca_file: str | None = None  # rediss://: the CA that signed the server's certificate
    redis_cert_file: str | None = None  # rediss:// with client certificates
    redis_key_file: str | None = None
    redis_outage_s: float = DEFAULT_OUTAGE_S
    runs_dir: Path = Path("runs")
    log_file: Path | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 8765
    wait_clients_s: float = 300.0
    heartbeat_ttl_ms: int = 5000
    eval_threads: int = 1
    eval_every: int = 1
    # "both": federated every round (the clients' validation splits; what PBT, merges and
    # the final selection decide on) and central every eval_every rounds and at the end (the
    # test set, for reporting); "federated" or "central": one of the two
    evaluation: str = "both"
    eval_nice: int | None = None  # None: 0 with one slot, EVAL_NICE_SHARED with several
    keep_checkpoints: int = 2
    max_update_bytes: int = 2 * 1024**3
    verify_digests: bool = True
    blob_ttl_ms: int = 30 * 60 * 1000
    local_agents: int = 0
    local_handoff: bool = True  # agents on this host exchange models and updates in /dev/shm
    local_devices: str = "cpu"
    local_threads: int = 1
    sign_updates: bool = False  # every result must carry its client's HMAC signature
    client_keys_dir: str | None = None  # DIR/CLIENT_ID.key; local agents' keys are generated
    progress: bool = True
    mode: str = "weights"  # or "gradient": batch-gradient federation (coordinator.gradient)
    gradient_slots: int = 0  # with mode "weights": how many slots (the first) run gradient mode
    gradient_steps: int = 50  # gradient mode: steps per lease (a round)
    server_optimizer: str = "sgd"  # gradient mode: "sgd" or "adam"
    server_options: dict[str, Any] = field(default_factory=dict)

    def is_gradient_slot(self, slot_id: int) -> bool:
        """Whether this slot runs batch-gradient federation rather than weight rounds."""
        return self.mode == "gradient" or slot_id < self.gradient_slots

    def server_optimizer_options(self) -> dict[str, Any]:
        """The gradient slots' optimiser options: --lr, --momentum (SGD) and --weight-decay,
        then --server-option on top."""
        t = self.training
        base: dict[str, Any] = {"lr": t.lr, "weight_decay": t.weight_decay}
        if self.server_optimizer == "sgd":
            base["momentum"] = t.momentum
        return {**base, **self.server_options}
    # Slots that differ and cooperate (coordinator.population): per-slot overrides of the
    # command line (one map per slot, empty: all alike), PBT's explore bounds, merges.
    slot_overrides: tuple[dict[str, Any], ...] = ()
    explore_bounds: dict[str, list[float]] = field(default_factory=dict)
    population: str = "none"  # or "pbt"
    pbt_every: int = 2
    pbt_fraction: float = 0.25
    merge: str = "none"  # "final", or "every" with merge_every rounds
    merge_every: int = 0
    shared_init: bool = False

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.run_id

    @property
    def events_path(self) -> Path:
        return self.log_file or self.run_dir / "events.jsonl"

    @property
    def round_size(self) -> int:
        """How many clients a slot leases for one round at most."""
        if self.clients_per_round:
            return self.clients_per_round
        return max(1, -(-self.expected_clients // self.slots))

    def redis_settings(self, password: str | None = None) -> RedisSettings:
        """How to reach Redis (the password comes from `CoordinatorSecrets`, never from here)."""
        return RedisSettings(url=self.redis_url or "redis://127.0.0.1:6379",
                             username=self.redis_username, password=password,
                             tls_ca_file=self.redis_ca_file, tls_cert_file=self.redis_cert_file,
                             tls_key_file=self.redis_key_file, outage_s=self.redis_outage_s)

    @property
    def federated(self) -> bool:
        """Whether jobs evaluate their model on the clients' validation splits."""
        return self.evaluation in ("federated", "both")

    @property
    def central_every(self) -> int:
        """Central (test-set) evaluations every this many rounds; 0 never."""
        return 0 if self.evaluation == "federated" else self.eval_every

    def full_task_options(self) -> dict[str, Any]:
        """Task options as sent in every job; the partition follows the client count."""
        return {"num_clients": self.expected_clients, **self.task_options}

    @property
    def evaluation_nice(self) -> int:
        """Nice steps for the evaluation thread: as asked, else 0 with one slot (its one
        evaluation per round is the run's only progress signal) and EVAL_NICE_SHARED with
        several (their evaluations multiply with the slots and would take the trainers'
        CPU; behind, the older ones are skipped)."""
        if self.eval_nice is not None:
            return self.eval_nice
        return 0 if self.slots == 1 else EVAL_NICE_SHARED

    def to_json(self) -> str:
        body = dataclasses.asdict(self)
        return json.dumps(body, default=str, indent=2)

    @classmethod
    def from_json(cls, text: str, **overrides: Any) -> CoordinatorSettings:
        body = json.loads(text)
        # A run saved before step budgets existed trained whole epochs: it resumes so.
        body["training"] = TrainingSettings(**{"local_steps": 0, **body.get("training", {})})
        for key in ("runs_dir", "log_file"):
            if body.get(key) is not None:
                body[key] = Path(body[key])
        body.update(overrides)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in names})


@dataclass(frozen=True)
class CoordinatorSecrets:
    """What the entry point read from secret files or the environment; never saved or logged.

    `keyring` None means updates are not signed (the single-machine default).
    """

    redis_password: str | None = field(default=None, repr=False)
    api_token: str | None = field(default=None, repr=False)
    api_token_file: str | None = None  # where a generated token was written for the operator
    keyring: Keyring | None = None
