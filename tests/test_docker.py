"""The compose cluster for real: compose/cluster-test.sh, run and read back.

The script builds the image as compose/README.md says for a machine without a
registry, then from a fresh checkout with nothing written first (no compose/.env, no
PWFL_* variable, no password in the environment) runs the README's commands
unchanged (`up -d`, `logs -f coordinator`, `curl .../status`, `down -v`) on the
default job: Redis (its password generated into the secrets volume), the coordinator
and three agents, 3 slots x 5 rounds of Fashion-MNIST. It kills one agent container
mid-run, waits until the coordinator reports its clients lost while the run goes on,
reads the coordinator's final table and tears it all down, starting (and stopping) a
private Docker daemon where none answers. It writes what happened to PWFL_TEST_OUT;
this test checks it. Where no daemon can be had (not root, no dockerd, no way to get
a base image) the script exits 77 with the reason, and the test skips with it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(5400)]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "compose" / "cluster-test.sh"
SKIP = 77
README = ROOT / "compose" / "README.md"
# The default job, as compose/README.md states it ("3 weight slots, 6 clients, 5 rounds").
SLOTS, ROUNDS = 3, 5
KILLED_AGENT_CLIENTS = {"2", "3"}  # agent-b's, in compose/docker-compose.yml


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One run of the script (several minutes from cold); its result.json."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client: apt-get install docker.io docker-compose debootstrap")
    out = Path(os.environ.get("PWFL_TEST_OUT") or tmp_path_factory.mktemp("cluster"))
    env = {**os.environ, "PWFL_TEST_OUT": str(out)}
    try:
        proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                              check=False, timeout=5300)
    except subprocess.TimeoutExpired:
        # The script's own teardown did not run: stop the daemon it may have started.
        subprocess.run(["bash", str(ROOT / "compose" / "dockerd-local.sh"), "stop"],
                       check=False, timeout=120)
        raise
    if proc.returncode == SKIP:
        pytest.skip((out / "skip.txt").read_text().strip() if (out / "skip.txt").exists()
                    else proc.stderr.strip()[-500:])
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result: dict[str, object] = json.loads((out / "result.json").read_text())
    result["timings"] = json.loads((out / "timings.json").read_text())
    # Every command the script ran, `down -v` (its teardown, after the verdict) included.
    result["commands"] = (out / "commands.txt").read_text().splitlines()
    return result


def test_every_slot_finishes_although_an_agent_is_killed(cluster_run: dict[str, object]
                                                          ) -> None:
    """The coordinator exits 0 and its final table shows every slot done with all its
    rounds, after `docker kill` of an agent."""
    assert cluster_run["coordinator_exit"] == 0
    assert cluster_run["status"] == "finished"
    slots = cluster_run["slots"]
    assert isinstance(slots, list)
    assert len(slots) == SLOTS
    assert all((s["rounds_done"], s["rounds"], s["state"]) == (ROUNDS, ROUNDS, "done")
               for s in slots)


def test_the_default_job_ran_from_the_readmes_commands(cluster_run: dict[str, object]
                                                       ) -> None:
    """The run was the README's default job (the Fashion-MNIST task, its rounds) and every
    command the script ran is one the README shows, as written."""
    assert str(cluster_run["task"]).endswith("fashion_mnist:FashionMnistTask")
    assert cluster_run["rounds"] == ROUNDS
    readme = README.read_text()
    commands = cluster_run["commands"]
    assert isinstance(commands, list)
    assert {c.split(" -f ", 1)[1] for c in commands if " -f " in c} >= {
        "compose/docker-compose.yml up -d", "compose/docker-compose.yml logs -f coordinator",
        "compose/docker-compose.yml down -v"}
    for command in commands:  # Debian's docker-compose 1.29: "the commands are the same"
        assert re.sub(r"^docker-compose ", "docker compose ", command) in readme, command


def test_the_killed_agents_clients_are_the_ones_lost(cluster_run: dict[str, object]) -> None:
    """Heartbeat expiry reports exactly the killed agent's clients lost. The script kills
    it with rounds to go and waits (on /status) until both are lost while the run still
    goes on, so the run cannot end before their heartbeats expire."""
    lost = set(cluster_run["clients_lost"])  # type: ignore[call-overload]
    assert lost == KILLED_AGENT_CLIENTS


def test_the_slots_learned(cluster_run: dict[str, object]) -> None:
    """Training really ran in the containers: every slot is far above chance (10%)."""
    slots = cluster_run["slots"]
    assert isinstance(slots, list)
    assert all(s["last_accuracy"] > 0.5 for s in slots)


def test_redis_refuses_clients_without_the_password(cluster_run: dict[str, object]) -> None:
    """The cluster's Redis answers an unauthenticated PING with NOAUTH."""
    assert str(cluster_run["redis_ping_without_password"]).startswith("NOAUTH")


def test_the_run_came_from_a_fresh_checkout_without_env_file(cluster_run: dict[str, object]
                                                              ) -> None:
    """`up` ran on a copy of the checkout that has no compose/.env, and the coordinator's
    log ended with its final table."""
    assert cluster_run["env_file_present"] is False
    table = "\n".join(cluster_run["final_table"])  # type: ignore[arg-type]
    assert "PWFL run finished" in table
    assert "clients alive: 4" in table  # its caption: agent-b's two clients are gone
    assert str(cluster_run["wall_time"]).startswith("wall time ")


def test_the_redis_password_was_generated_into_the_secrets_volume(
    cluster_run: dict[str, object],
) -> None:
    """The one-shot secrets step exited 0, left a 0600 file owned by pwfl, and no
    long-running container carries the password in its environment."""
    assert cluster_run["secrets_exit"] == 0
    mode, owner, size = str(cluster_run["secret_file"]).split()
    assert (mode, owner) == ("600", "pwfl")
    assert int(size) >= 32
    assert cluster_run["password_in_environment_of"] == 0
