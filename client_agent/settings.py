"""The agent's settings: one frozen dataclass, from the command line."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


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

    @property
    def name(self) -> str:
        return self.agent_id or f"{socket.gethostname()}-{os.getpid()}"
