"""The compose cluster's files, checked without a Docker daemon (fast; runs in CI).

`docker-compose config` (or `docker compose config`) validates the compose file where
either is installed; text checks that need no YAML parser pin what the cluster relies
on (format 2.4, health-gated start, shm size, a generated Redis password, no secrets in
files), and the Dockerfile,
.dockerignore and requirements helper are checked against pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose"
COMPOSE_FILE = COMPOSE / "docker-compose.yml"
SERVICES = {"secrets", "redis", "coordinator", "agent-a", "agent-b", "agent-c"}
PWFL_SERVICES = SERVICES - {"secrets"}
SECRETS_MOUNT = "secrets:/var/lib/pwfl/secrets"
AGENTS = sorted(s for s in SERVICES if s.startswith("agent-"))
FAKE_PASSWORD = "not-a-real-password"


def compose_command() -> list[str] | None:
    """`docker compose` (v2) or `docker-compose` (v1), whichever is installed."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 check=False).returncode == 0:
        return [docker, "compose"]
    v1 = shutil.which("docker-compose")
    return [v1] if v1 else None


def run_config(env_file: Path, *args: str, password: str | None = None
               ) -> subprocess.CompletedProcess[str]:
    command = compose_command()
    if command is None:
        pytest.skip("neither docker compose nor docker-compose is installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PWFL_")}
    if password is not None:
        env["PWFL_REDIS_PASSWORD"] = password
    # An empty env file: a developer's compose/.env must not decide the outcome.
    env_file.write_text("")
    return subprocess.run([*command, "-f", str(COMPOSE_FILE), "--env-file", str(env_file),
                           "config", *args], capture_output=True, text=True, env=env,
                          check=False, timeout=60)


def service_blocks(text: str) -> dict[str, str]:
    """Each service's lines under `services:`, by two-space indentation (no YAML parser)."""
    body = text.split("\nservices:\n", 1)[1].split("\nvolumes:\n", 1)[0]
    blocks: dict[str, str] = {}
    name = ""
    for line in body.splitlines():
        match = re.match(r"^  ([A-Za-z0-9_-]+):\s*$", line)
        if match:
            name = match.group(1)
            blocks[name] = ""
        elif name:
            blocks[name] += line + "\n"
    return blocks


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE_FILE.read_text()


def test_compose_config_is_valid_with_nothing_set(tmp_path: Path) -> None:
    """With no compose/.env and no password anywhere, docker-compose accepts the file (its
    service_completed_successfully condition included) and finds six services, three
    volumes."""
    result = run_config(tmp_path / "env", "--services")
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == SERVICES
    volumes = run_config(tmp_path / "env", "--volumes")
    assert set(volumes.stdout.split()) == {"redis-data", "runs", "secrets"}
    resolved = run_config(tmp_path / "env")
    assert resolved.returncode == 0, resolved.stderr
    assert "condition: service_completed_successfully" in resolved.stdout


def test_a_password_set_in_compose_env_reaches_only_the_secrets_step(tmp_path: Path) -> None:
    """PWFL_REDIS_PASSWORD (compose/.env) goes to the one-shot secrets service and to no
    long-running container's environment; they all read the password file instead."""
    result = run_config(tmp_path / "env", password=FAKE_PASSWORD)
    assert result.returncode == 0, result.stderr
    blocks = service_blocks("\n" + result.stdout)  # it may begin with `services:`
    assert FAKE_PASSWORD in blocks["secrets"]
    for service in PWFL_SERVICES:
        assert FAKE_PASSWORD not in blocks[service], service
        assert "PWFL_REDIS_PASSWORD_FILE: /var/lib/pwfl/secrets/redis-password" in (
            blocks[service]), service


def test_the_secrets_volume_is_mounted_by_redis_and_pwfl_services_only(
    compose_text: str,
) -> None:
    """The secrets step writes the volume; Redis, the coordinator and the agents read it
    (read-only), and they start only after the step succeeded."""
    blocks = service_blocks(compose_text)
    assert re.search(rf"- {SECRETS_MOUNT}\n", blocks["secrets"])
    for service in ("redis", "coordinator"):
        assert f"- {SECRETS_MOUNT}:ro" in blocks[service], service
    anchor = compose_text.split("x-agent: &agent", 1)[1].split("\nservices:", 1)[0]
    assert f"- {SECRETS_MOUNT}:ro" in anchor
    # The secrets step, redis, the coordinator and the agents' anchor: no one else.
    assert compose_text.count("secrets:/var/lib/pwfl/secrets") == 4
    assert re.search(r"secrets:\n\s+condition: service_completed_successfully",
                     blocks["redis"])
    assert 'command: ["pwfl-secrets", "/var/lib/pwfl/secrets/redis-password"]' in (
        blocks["secrets"])
    assert 'restart: "no"' in blocks["secrets"]
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    assert "install -d -o pwfl -g pwfl -m 0700 /var/lib/pwfl/secrets" in dockerfile


def test_compose_file_format_works_with_compose_v1_and_v2(compose_text: str) -> None:
    """Format 2.4: depends_on conditions and shm_size exist in v1 1.29 and in v2."""
    assert re.search(r'^version: "2\.4"$', compose_text, re.M)
    assert set(service_blocks(compose_text)) == SERVICES


def test_agents_start_after_redis_is_healthy_and_restart(compose_text: str) -> None:
    """Every agent waits for a healthy Redis, restarts on failure and has a big /dev/shm."""
    anchor = compose_text.split("x-agent: &agent", 1)[1].split("\nservices:", 1)[0]
    assert "condition: service_healthy" in anchor
    assert "restart: on-failure" in anchor
    assert re.search(r"shm_size: \$\{PWFL_AGENT_SHM:-1g\}", anchor)
    blocks = service_blocks(compose_text)
    clients: list[str] = []
    for agent in AGENTS:
        assert "<<: *agent" in blocks[agent]
        ids = re.search(r"--clients ([0-9,]+)", blocks[agent])
        assert ids, agent
        clients += ids.group(1).split(",")
    assert sorted(clients, key=int) == [str(i) for i in range(6)]  # each client on one agent


def test_coordinator_runs_the_default_job_for_agents_elsewhere(compose_text: str) -> None:
    """3 slots, 6 clients, no local agents, HTTP on all interfaces, runs on a volume."""
    block = service_blocks(compose_text)["coordinator"]
    for option in ("--slots ${PWFL_SLOTS:-3}", "--clients 6", "--local-agents 0",
                   "--http-host 0.0.0.0", "--runs-dir /data/runs"):
        assert option in block
    assert "/healthz" in block
    assert "runs:/data" in block
    assert "condition: service_healthy" in block
    # Published on the host's loopback only, unless PWFL_HTTP_BIND says otherwise.
    assert re.search(r'"\$\{PWFL_HTTP_BIND:-127\.0\.0\.1\}:\$\{PWFL_HTTP_PORT:-8765\}:8765"',
                     block)


def test_redis_keeps_an_aof_on_a_named_volume_with_a_health_check(compose_text: str) -> None:
    """Redis: pwfl-redis (AOF on), a named volume, PING as health check, always restarted."""
    block = service_blocks(compose_text)["redis"]
    assert 'command: ["pwfl-redis"]' in block
    assert "redis-data:/data" in block
    assert '"pwfl-redis", "--ping"' in block
    assert "restart: unless-stopped" in block
    assert "--appendonly yes" in (COMPOSE / "bin" / "pwfl-redis").read_text()


def test_no_secret_is_written_in_the_compose_files(compose_text: str) -> None:
    """A password of one's own comes from compose/.env (git-ignored), never from a tracked
    file; unset, it is empty and the secrets step generates one."""
    assert compose_text.count("${PWFL_REDIS_PASSWORD") == 1
    assert "PWFL_REDIS_PASSWORD: ${PWFL_REDIS_PASSWORD:-}" in service_blocks(compose_text)[
        "secrets"]
    assert "requirepass" not in compose_text
    assert not re.search(r"redis://:[^@/]+@", compose_text)  # no password in a URL
    example = (COMPOSE / ".env.example").read_text()
    assert re.search(r"^PWFL_REDIS_PASSWORD=$", example, re.M)
    assert "compose/.env" in (ROOT / ".gitignore").read_text().split()


def test_dockerfile_base_is_an_argument_users_can_pull() -> None:
    """The base image is a build argument defaulting to a public Python 3.11 bookworm image."""
    text = (COMPOSE / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim-bookworm$", text, re.M)
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX=", text, re.M)


def test_dockerfile_installs_torch_before_the_code_and_runs_as_a_user() -> None:
    """torch, then the other dependencies, then the code; the last word is USER pwfl."""
    lines = [ln for ln in (COMPOSE / "Dockerfile").read_text().splitlines()
             if ln and not ln.startswith("#")]
    text = "\n".join(lines)
    torch_at = text.index('pip install --index-url "$TORCH_INDEX"')
    deps_at = text.index("pip install -r /tmp/requirements.txt")
    code_at = text.index("COPY . /opt/pwfl-src/")
    assert torch_at < deps_at < code_at
    assert lines[-1] == "USER pwfl"
    assert "dataset-fashion-mnist" in text
    assert "redis-server" in text


def test_dockerignore_sends_only_the_code() -> None:
    """The build context is an allow-list: every package, never .venv, runs or compose/.env."""
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*"
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    for pattern in include:
        package = pattern.rstrip("*")
        if (ROOT / package).is_dir():
            assert f"!{package}/" in rules, package
    assert not any(r.startswith("!") and (".venv" in r or ".env" in r or "runs" in r)
                   for r in rules)


def load_requirements_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compose_requirements",
                                                  COMPOSE / "requirements.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_requirements_are_pyprojects_without_torch() -> None:
    """The image installs every dependency and build requirement; torch comes separately."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = load_requirements_module().requirements(pyproject)
    declared = pyproject["project"]["dependencies"] + pyproject["build-system"]["requires"]
    assert not any(r.lower().startswith(("torch>", "torch=", "torchvision")) for r in wanted)
    assert set(declared) - set(wanted) == {r for r in declared if r.startswith("torch")}


def test_scripts_are_executable_and_parse() -> None:
    """The shell scripts a person runs are executable and pass `bash -n` / `sh -n`."""
    scripts = [*COMPOSE.glob("*.sh"), *(COMPOSE / "bin").iterdir()]
    for script in scripts:
        assert os.access(script, os.X_OK), script
        shell = "sh" if script.read_text().startswith("#!/bin/sh") else "bash"
        result = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True,
                                check=False)
        assert result.returncode == 0, (script, result.stderr)


def run_secrets_step(path: Path, password: str | None = None
                     ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PWFL_")}
    if password is not None:
        env["PWFL_REDIS_PASSWORD"] = password
    return subprocess.run(["sh", str(COMPOSE / "bin" / "pwfl-secrets"), str(path)], env=env,
                          capture_output=True, text=True, check=True, timeout=30)


def test_the_secrets_step_generates_once_keeps_and_yields_to_compose_env(tmp_path: Path
                                                                          ) -> None:
    """pwfl-secrets: a first start writes a random 0600 password file, a second keeps it, a
    PWFL_REDIS_PASSWORD replaces it; no run prints the password."""
    path = tmp_path / "secrets" / "redis-password"
    path.parent.mkdir(mode=0o700)
    first = run_secrets_step(path)
    generated = path.read_text().strip()
    assert len(generated) >= 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert "generated" in first.stdout
    again = run_secrets_step(path)
    assert path.read_text().strip() == generated
    assert "kept" in again.stdout
    own = run_secrets_step(path, password=FAKE_PASSWORD)
    assert path.read_text().strip() == FAKE_PASSWORD
    assert path.stat().st_mode & 0o777 == 0o600
    for result in (first, again, own):
        assert generated not in result.stdout + result.stderr
        assert FAKE_PASSWORD not in result.stdout + result.stderr
    assert sorted(p.name for p in path.parent.iterdir()) == ["redis-password"]
