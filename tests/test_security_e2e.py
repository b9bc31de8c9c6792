"""Security end to end: the real coordinator and agents, each logged in as its own Redis
user over TLS, signing updates with per-client keys; forged updates; the API token."""

from __future__ import annotations

import json
import secrets
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis

from bus.credentials import Keyring, write_secret
from bus.embedded import EmbeddedRedis
from bus.keys import Keys
from tests.conftest import RedisFactory
from tests.e2e import Run, by_slot_round, start_coordinator
from tests.security import account, files_containing, make_tls, start_agent, stop, write_acl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

SYNTHETIC = ("--task", "synthetic", "--slots", "2", "--clients", "4", "--rounds", "2")


def _keys(folder: Path, keyring: Keyring, name: str, clients: list[str]) -> str:
    return str(keyring.subset(clients).write_dir(folder / f"{name}-keys"))


def test_acl_tls_and_signing_run_end_to_end_without_leaking_secrets(
        redis_factory: RedisFactory, tmp_path: Path,
        popen_agents: list[subprocess.Popen[bytes]]) -> None:
    """Coordinator and two silos, each its own ACL user over rediss://, finish a signed run;
    Redis denied no command, and no password, key or token appears in any log."""
    vault = tmp_path / "secrets"
    vault.mkdir(mode=0o700)
    tls = make_tls(tmp_path / "tls")
    admin, coordinator = account(vault, "admin"), account(vault, "coordinator")
    silo_a, silo_b = account(vault, "silo-a"), account(vault, "silo-b")
    aclfile = write_acl(vault, admin=admin, coordinator=coordinator,
                        agents=((silo_a, ["0", "1"]), (silo_b, ["2", "3"])))
    server = redis_factory(tls=tls, aclfile=aclfile, username=admin.name,
                           password=admin.password)
    keyring = Keyring().with_generated(["0", "1", "2", "3"])
    token = secrets.token_urlsafe(24)
    write_secret(vault / "api.token", token)
    logs, ca = tmp_path / "logs", ["--redis-ca-file", str(tls.ca_file)]
    run = start_coordinator(
        server.url, logs, "secure", *SYNTHETIC, "--redis-user", coordinator.name,
        "--redis-password-file", str(coordinator.password_file), *ca,
        "--client-keys", _keys(vault, keyring, "coordinator", ["0", "1", "2", "3"]),
        "--api-token-file", str(vault / "api.token"))
    popen_agents.append(start_agent(server.url, logs, "silo-a", "0,1", "--redis-user", silo_a.name,
                              "--redis-password-file", str(silo_a.password_file), *ca,
                              "--client-keys", _keys(vault, keyring, "silo-a", ["0", "1"])))
    popen_agents.append(start_agent(  # this one takes its secrets from the environment
        server.url, logs, "silo-b", "2,3", *ca,
        env={"PWFL_REDIS_USERNAME": silo_b.name, "PWFL_REDIS_PASSWORD": silo_b.password,
             "PWFL_CLIENT_KEYS": _keys(vault, keyring, "silo-b", ["2", "3"])}))
    with run:
        assert run.wait(300) == 0, run.output()[-4000:]
    assert [stop(a) for a in popen_agents] == [0, 0]
    assert run.events("run_started")[0]["signing"] is True
    assert len(run.events("update_folded")) == 8
    assert run.events("update_rejected") == []
    # Each silo declared its clients' sizes, signed with their keys (issue 23).
    assert all(e["declared_examples"] for e in run.events("client_registered"))
    with redis.Redis.from_url(server.url, username=admin.name, password=admin.password,
                              ssl_ca_certs=str(tls.ca_file)) as r:
        assert r.acl_log() == [], "a role lacked a permission it used"
    needles = [a.password for a in (admin, coordinator, silo_a, silo_b)]
    needles += [token, *(k.decode() for k in keyring.keys.values())]
    assert server.workdir is not None
    assert files_containing(logs, *needles) + files_containing(server.workdir, *needles) == []


def _status(run: Run) -> dict[str, Any]:
    url = run.events("http_listening")[0]["url"]
    with urllib.request.urlopen(url + "/status", timeout=10) as response:  # noqa: S310 - ours
        body: dict[str, Any] = json.load(response)
    return body


def _post_stop(run: Run, token: str | None) -> int:
    url = run.events("http_listening")[0]["url"] + "/stop"
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, method="POST", headers=headers)  # noqa: S310 - ours
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - ours
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _rejected_clients(events: list[dict[str, Any]]) -> set[str]:
    return {e["client_id"] for e in events
            if e["event"] == "update_rejected" and e["reason"] == "bad_signature"}


def test_updates_forged_or_unsigned_are_rejected_and_stop_needs_the_token(
        redis_server: EmbeddedRedis, tmp_path: Path,
        popen_agents: list[subprocess.Popen[bytes]]) -> None:
    """An agent signing as another client, or not at all, is rejected as bad_signature and
    counted in /status; POST /stop needs the token and leaves a run that resumes to the end."""
    vault, runs = tmp_path / "secrets", tmp_path / "runs"
    keyring = Keyring().with_generated(["0", "1", "2"])
    mallory = Keyring({"1": Keyring().with_generated(["1"]).keys["1"]})  # not client 1's key
    token = secrets.token_urlsafe(24)
    write_secret(tmp_path / "api.token", token)
    run = start_coordinator(
        redis_server.url, runs, "forged", "--task", "synthetic", "--slots", "1", "--clients",
        "3", "--rounds", "2", "--deadline", "120",
        "--client-keys", _keys(vault, keyring, "coordinator", ["0", "1", "2"]),
        "--api-token-file", str(tmp_path / "api.token"))
    only_run = ("--run-id", "forged")
    popen_agents.append(start_agent(redis_server.url, tmp_path, "honest", "0", *only_run,
                              "--client-keys", _keys(vault, keyring, "honest", ["0"])))
    popen_agents.append(start_agent(redis_server.url, tmp_path, "mallory", "1", *only_run,
                              "--client-keys", str(mallory.write_dir(vault / "mallory"))))
    popen_agents.append(start_agent(redis_server.url, tmp_path, "unsigned", "2", *only_run))
    with run:
        run.wait_for(lambda ev: _rejected_clients(ev) == {"1", "2"} and any(
            e["event"] == "update_received" and e["client_id"] == "0" for e in ev), 120)
        assert _status(run)["rejected"] == {"bad_signature": 2}
        assert [_post_stop(run, None), _post_stop(run, "not-the-token")] == [401, 401]
        assert _post_stop(run, token) == 202
        assert run.wait(60) == 1
    assert "resume with" in run.output()
    assert run.events("run_finished")[-1]["status"] == "interrupted"
    with redis.Redis.from_url(redis_server.url) as r:
        assert r.hget(Keys("forged").state(), "status") == b"interrupted"
    assert [stop(a) for a in popen_agents] == [0, 0, 0]
    resumed = start_coordinator(redis_server.url, runs, "forged", "--resume", "forged",
                                "--local-agents", "2")
    with resumed:
        assert resumed.wait(300) == 0, resumed.output()[-4000:]
    closed = set(by_slot_round(resumed.events(), "round_closed"))
    assert closed == {(0, 1), (0, 2)}
    after = resumed.events()[[e["event"] for e in resumed.events()].index("run_resumed"):]
    assert not [e for e in after if e["event"] == "update_rejected"]
