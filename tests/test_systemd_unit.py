"""The silo hosts' systemd unit (compose/pwfl-agent.service).

`systemd-analyze verify` checks it where systemd is installed (with ExecStart's
interpreter pointed at one that exists here, since /opt/pwfl is not installed on the
test machine); a small parser checks what the deployment guide promises either way.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "compose" / "pwfl-agent.service"
ENV_EXAMPLE = ROOT / "compose" / "pwfl-agent.env.example"


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every directive, in order (keys may repeat)."""
    found: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {raw!r}"
        found.append((section, key.strip(), value.strip()))
    return found


def values(section: str, key: str) -> list[str]:
    return [v for s, k, v in directives(UNIT.read_text()) if (s, k) == (section, key)]


def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    """systemd-analyze verify prints no warning and no error for the unit."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the parser tests still run)")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/pwfl/bin/python", sys.executable))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_unit_runs_the_agent_as_its_own_user() -> None:
    """The agent runs as the dedicated user pwfl, from the image's or pip's venv."""
    assert next(s for s, _, _ in directives(UNIT.read_text())) == "Unit"
    assert values("Service", "User") == ["pwfl"]
    (exec_start,) = values("Service", "ExecStart")
    assert exec_start.startswith("/opt/pwfl/bin/python -m client_agent ")
    for option in ("--redis ${PWFL_REDIS_URL}", "--clients ${PWFL_CLIENTS}",
                   "--devices ${PWFL_DEVICES}"):
        assert option in exec_start
    assert values("Install", "WantedBy") == ["multi-user.target"]


def test_unit_restarts_the_agent() -> None:
    """A crashed agent, or one whose run has finished, is started again."""
    assert values("Service", "Restart") == ["always"]
    assert int(values("Service", "RestartSec")[0]) > 0


def test_unit_reads_the_password_from_a_credential_file() -> None:
    """The Redis password is a systemd credential passed as a file, never a value."""
    assert values("Service", "LoadCredential") == ["redis-password:/etc/pwfl/redis-password"]
    assert "PWFL_REDIS_PASSWORD_FILE=%d/redis-password" in values("Service", "Environment")
    assert not any(k == "Environment" and v.startswith("PWFL_REDIS_PASSWORD=")
                   for _, k, v in directives(UNIT.read_text()))
    assert values("Service", "EnvironmentFile") == ["/etc/pwfl/agent.env"]


def test_env_example_sets_what_the_unit_needs_and_no_secret() -> None:
    """The example environment file names every variable ExecStart uses, and no password."""
    settings = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                    if line and not line.startswith("#"))
    assert {"PWFL_REDIS_URL", "PWFL_CLIENTS", "PWFL_DEVICES", "PWFL_AGENT_ARGS"} <= set(settings)
    assert settings["PWFL_REDIS_URL"].startswith("rediss://")
    assert not any("PASSWORD" in key for key in settings)
