"""Local agents get their secrets as private files: never in their argv or environment."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import pytest

from bus.credentials import Keyring, read_secret
from coordinator.local_agents import AgentAccess, LocalAgents

PASSWORD = "redis-" + "p" * 20
KEYRING = Keyring({c: (c * 32).encode() for c in "0123"})


class Spawned:
    """What asyncio.create_subprocess_exec was asked to start (nothing is started)."""

    def __init__(self, argv: tuple[str, ...], env: dict[str, str]) -> None:
        self.argv, self.env, self.pid, self.returncode = list(argv), env, 0, 0

    async def wait(self) -> int:
        return 0

    def terminate(self) -> None:
        """Never called: the fake has already exited (returncode 0)."""

    kill = terminate


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[Spawned]:
    """Agents LocalAgents asked to start, in order (asyncio.create_subprocess_exec faked)."""
    started: list[Spawned] = []

    async def spawn(*argv: str, env: dict[str, str], **_: Any) -> Spawned:
        started.append(Spawned(argv, env))
        return started[-1]

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)
    return started


async def test_secrets_go_to_0600_files_and_are_removed(tmp_path: Path, spawned: list[Spawned],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each agent gets the password and only its clients' keys as 0600 files; stop removes them."""
    monkeypatch.setenv("PWFL_REDIS_PASSWORD", PASSWORD)
    access = AgentAccess(redis_options=("--redis-user", "coordinator"), redis_password=PASSWORD,
                         keyring=KEYRING)
    agents = LocalAgents(redis_url="redis://x", run_id="r", run_dir=tmp_path, devices="cpu",
                         threads=1, access=access)
    await agents.start(["0", "1", "2", "3"], 2)
    _check_secret_files(spawned[0], ["0", "1"])
    secret_dir = _check_secret_files(spawned[1], ["2", "3"])
    await agents.stop()
    assert not secret_dir.exists()


def _check_secret_files(agent: Spawned, clients: list[str]) -> Path:
    """No secret in argv or env; 0600 files with the password and these clients' keys only."""
    text = " ".join(agent.argv)
    assert PASSWORD not in text
    assert all(k.decode() not in text for k in KEYRING.keys.values())
    assert "PWFL_REDIS_PASSWORD" not in agent.env
    assert option(agent.argv, "--redis-user") == "coordinator"
    password_file = Path(option(agent.argv, "--redis-password-file"))
    keys_dir = Path(option(agent.argv, "--client-keys"))
    assert read_secret(password_file) == PASSWORD
    assert sorted(p.name for p in keys_dir.iterdir()) == [f"{c}.key" for c in clients]
    for path in (password_file, *keys_dir.iterdir()):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(password_file.parent.stat().st_mode) == 0o700
    return password_file.parent


async def test_without_secrets_no_files_are_written(tmp_path: Path,
                                                    spawned: list[Spawned]) -> None:
    """The single-machine default passes no secret options at all."""
    agents = LocalAgents(redis_url="redis://x", run_id="r", run_dir=tmp_path, devices="cpu",
                         threads=1)
    await agents.start(["0", "1"], 1)
    assert not {"--redis-password-file", "--client-keys"} & set(spawned[0].argv)
    await agents.stop()
