"""Agents started by the coordinator itself for a single-machine run.

Each is a `python -m client_agent` subprocess hosting a contiguous share of the
client ids; its console output goes to a file in the run directory. They exit
on their own when the run is marked finished; anything still running at the
end is terminated, then killed.

Secrets reach them as files, never as arguments or inherited environment
variables: the Redis password and each agent's own clients' signing keys are
written 0600 into a private (0700) temporary directory, removed at `stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from bus.credentials import SECRET_ENV, Keyring, write_secret

log = structlog.get_logger()


@dataclass(frozen=True)
class AgentAccess:
    """How local agents reach Redis (options, password) and sign (keyring; None: no signing)."""

    redis_options: tuple[str, ...] = ()  # --redis-user NAME, --redis-ca-file FILE, ...
    redis_password: str | None = field(default=None, repr=False)
    keyring: Keyring | None = None
    allowed_task: str | None = None  # the run's task, which local agents must run

    @property
    def has_secrets(self) -> bool:
        return self.redis_password is not None or self.keyring is not None


def split_clients(client_ids: list[str], agents: int) -> list[list[str]]:
    """Contiguous, nearly equal shares; no agent without clients."""
    agents = max(1, min(agents, len(client_ids)))
    base, extra = divmod(len(client_ids), agents)
    shares, start = [], 0
    for i in range(agents):
        size = base + (1 if i < extra else 0)
        shares.append(client_ids[start : start + size])
        start += size
    return shares


class LocalAgentFailed(Exception):
    """A local agent exited before the run could start."""


class LocalAgents:
    def __init__(self, *, redis_url: str, run_id: str, run_dir: Path, devices: str,
                 threads: int, access: AgentAccess | None = None) -> None:
        self._redis_url, self._run_id, self._run_dir = redis_url, run_id, run_dir
        self._devices, self._threads = devices, threads
        self._access = access or AgentAccess()
        self._secret_dir: Path | None = None
        self._procs: list[asyncio.subprocess.Process] = []

    async def start(self, client_ids: list[str], agents: int) -> None:
        if self._access.has_secrets:
            self._secret_dir = Path(tempfile.mkdtemp(prefix="pwfl-secrets-"))  # mode 0700
        for index, share in enumerate(split_clients(client_ids, agents)):
            await self._start_one(index, share)

    def _secret_args(self, index: int, clients: list[str]) -> list[str]:
        """Options naming this agent's secret files (written here, 0600)."""
        access, folder = self._access, self._secret_dir
        if folder is None:
            return []
        args = []
        if access.redis_password is not None:
            path = folder / "redis.password"
            if not path.exists():
                write_secret(path, access.redis_password)
            args += ["--redis-password-file", str(path)]
        if access.keyring is not None:
            keys = access.keyring.subset(clients).write_dir(folder / f"agent-{index}")
            args += ["--client-keys", str(keys)]
        return args

    async def _start_one(self, index: int, clients: list[str]) -> None:
        agent_id = f"local-{index}"
        argv = [sys.executable, "-m", "client_agent", "--redis", self._redis_url,
                "--run-id", self._run_id, "--clients", ",".join(clients),
                "--devices", self._devices, "--threads", str(self._threads),
                "--agent-id", agent_id, "--exit-when-done", "--exit-with-parent",
                "--log-file", str(self._run_dir / f"agent-{index}.jsonl"),
                *self._access.redis_options, *self._secret_args(index, clients)]
        if self._access.allowed_task is not None:
            argv += ["--allow-task", self._access.allowed_task]
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        console = (self._run_dir / f"agent-{index}.console.log").open("ab")
        proc = await asyncio.create_subprocess_exec(*argv, stdout=console, stderr=console,
                                                    stdin=asyncio.subprocess.DEVNULL, env=env)
        console.close()
        self._procs.append(proc)
        log.info("local_agent_started", agent_id=agent_id, client_ids=clients, agent_pid=proc.pid)

    async def watch(self, run_started: asyncio.Event) -> None:
        """Wait for any agent to exit; before the run starts that is fatal, after it a warning."""
        waits = {asyncio.ensure_future(p.wait()): i for i, p in enumerate(self._procs)}
        while waits:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = waits.pop(task)
                self._exited(index, task.result(), run_started.is_set())

    def _exited(self, index: int, returncode: int, started: bool) -> None:
        console = self._run_dir / f"agent-{index}.console.log"
        tail = console.read_text(errors="replace").strip().splitlines()[-5:]
        log.warning("local_agent_exited", agent_id=f"local-{index}", returncode=returncode,
                    output=tail)
        if not started and returncode != 0:
            raise LocalAgentFailed(f"local agent {index} exited with code {returncode}:\n  "
                                   + "\n  ".join(tail))

    async def stop(self, timeout_s: float = 15.0) -> None:
        """Wait for the agents to leave; terminate, then kill, those that do not."""
        for proc in self._procs:
            await self._stop_one(proc, timeout_s)
        self._procs.clear()
        if self._secret_dir is not None:
            shutil.rmtree(self._secret_dir, ignore_errors=True)
            self._secret_dir = None

    async def _stop_one(self, proc: asyncio.subprocess.Process, timeout_s: float) -> None:
        for action in (None, proc.terminate, proc.kill):
            if action is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    action()
            try:
                async with asyncio.timeout(timeout_s):
                    await proc.wait()
                return
            except TimeoutError:
                continue
