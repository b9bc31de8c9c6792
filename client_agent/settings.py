"""The agent's settings: one frozen dataclass, from the command line and the environment."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from bus.connection import DEFAULT_OUTAGE_S, RedisSettings
from bus.credentials import Keyring
from serialization.tasks import BUILTIN_TASKS
from trainer_worker.emulation import EmulatedDevice


@dataclass(frozen=True)
class AgentSettings:
    redis_url: str
    client_ids: tuple[str, ...]
    devices: tuple[str, ...] = ("cpu",)
    run_id: str | None = None  # None: follow the active run
    agent_id: str = ""
    threads: int = 1
    log_file: str | None = None
    exit_when_done: bool = False
    exit_with_parent: bool = False  # local agents: leave when the coordinator that started us dies
    heartbeat_ttl_ms: int = 5000
    cache_bytes: int = 2 * 1024**3
    reclaim_idle_ms: int = 60_000
    max_deliveries: int = 5
    drain_timeout_s: float = 60.0
    namespace: str = "pwfl"
    redis_username: str | None = None
    redis_password: str | None = field(default=None, repr=False)  # from a file or the env
    redis_ca_file: str | None = None
    redis_cert_file: str | None = None
    redis_key_file: str | None = None
    redis_outage_s: float = DEFAULT_OUTAGE_S
    keyring: Keyring | None = None  # this agent's clients' signing keys; None: no signing
    train_timeout_s: float | None = None  # per training call; None: from the job's deadline
    # Task specs (module:factory) this agent runs; a job naming another is refused.
    allowed_tasks: frozenset[str] = frozenset(BUILTIN_TASKS.values())
    # Models and updates in shared memory with a coordinator proven to share this host.
    local_handoff: bool = True
    # Benchmarks only (bench/testbed): pad each training call to a nominal device time.
    emulated_device: EmulatedDevice | None = None

    @property
    def name(self) -> str:
        return self.agent_id or f"{socket.gethostname()}-{os.getpid()}"

    def redis_settings(self) -> RedisSettings:
        return RedisSettings(url=self.redis_url, username=self.redis_username,
                             password=self.redis_password, tls_ca_file=self.redis_ca_file,
                             tls_cert_file=self.redis_cert_file, tls_key_file=self.redis_key_file,
                             outage_s=self.redis_outage_s)
