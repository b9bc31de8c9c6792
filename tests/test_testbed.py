"""The emulated testbed (`bench/testbed`) leaves nothing behind, and its links do what the
profile says. Needs root and `ip netns` (skipped otherwise); quick: a few silos, no training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.testbed import PROFILES, Testbed, TestbedError, netns, silos
from bench.testbed.measure import measure
from bench.testbed.profiles import Profile

ROOT = Path(__file__).resolve().parents[1]
TESTBED = [sys.executable, "-m", "bench.testbed"]
pytestmark = pytest.mark.timeout(120)


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "the testbed needs root"
    try:
        netns.run("ip", "netns", "list")
        netns.run("tc", "-V")
    except TestbedError as exc:
        return f"no ip/tc here: {exc}"
    return None


needs_root = pytest.mark.skipif(_can_make_namespaces() is not None,
                                reason=_can_make_namespaces() or "")


def _kernel_objects(owner_pid: int) -> list[str]:
    """Namespaces and links of `owner_pid`'s testbed that still exist."""
    rows = [*json.loads(netns.run("ip", "-j", "netns", "list") or "[]"),
            *json.loads(netns.run("ip", "-j", "link", "show") or "[]")]
    names = (str(row.get("name", row.get("ifname"))) for row in rows)
    return sorted(n for n in names if n.startswith(f"{netns.PREFIX}{owner_pid}"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@needs_root
def test_silos_processes_and_links_are_gone_after_the_block() -> None:
    """Namespaces, veths (and their qdiscs) and a process inside a silo exist while the bed
    is up and are all gone after the `with` block."""
    with Testbed(PROFILES["wan"], silos=2) as bed:
        assert len(_kernel_objects(os.getpid())) == 4  # 2 namespaces + 2 host ends
        assert bed.counters()[0]["download_qdisc"] == "tbf"
        sleeper = bed.popen(bed.silos[1], ["sh", "-c", "echo $$; exec sleep 600"],
                            stdout=subprocess.PIPE)
        assert sleeper.stdout is not None
        pid = int(sleeper.stdout.readline())  # it is inside the namespace by now
        assert netns.run("ip", "netns", "pids", bed.silos[1].link.netns).split() == [str(pid)]
    sleeper.stdout.close()
    assert _kernel_objects(os.getpid()) == []
    assert sleeper.poll() is not None
    assert not _alive(pid)


@needs_root
def test_an_exception_inside_the_block_still_cleans_up() -> None:
    """An error raised while the bed is up propagates, and the bed is removed first."""
    with pytest.raises(RuntimeError, match="boom"), Testbed(PROFILES["lan"], silos=1):
        raise RuntimeError("boom")
    assert _kernel_objects(os.getpid()) == []


@needs_root
def test_sigterm_to_run_removes_the_bed_and_its_command() -> None:
    """`run PROFILE -- CMD` stopped by SIGTERM exits 143 and leaves no silo behind."""
    with subprocess.Popen([*TESTBED, "run", "wan", "--silos", "2", "--", "sleep", "600"],
                          cwd=ROOT, stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        assert b"testbed up" in proc.stderr.readline()
        assert len(_kernel_objects(proc.pid)) == 4
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(60) == 143
        finally:
            proc.kill()
    assert _kernel_objects(proc.pid) == []


def _other_threads(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]


@needs_root
@pytest.mark.parametrize("command", [["run", "wan", "--silos", "1", "--", "sleep", "600"],
                                     ["up", "wan", "--silos", "1"]], ids=["run", "up"])
def test_sigterm_that_lands_on_the_relay_thread_still_removes_the_bed(
        command: list[str]) -> None:
    """The kernel may hand a process-directed SIGTERM to any thread that does not block it.
    kill(2) on the relay thread's id makes it that thread: the bed still comes down. (It
    did not: `run`'s main thread slept in waitpid() until CMD ended, `up`'s in pause(),
    and a CI run hung.)"""
    with subprocess.Popen([*TESTBED, *command], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        while b"testbed up" not in (line := proc.stdout.readline()):
            assert line, "the testbed exited before it was up"
        time.sleep(0.5)  # for its main thread to settle into its wait
        (relay,) = _other_threads(proc.pid)
        os.kill(relay, signal.SIGTERM)
        try:
            assert proc.wait(30) == 143
        finally:
            proc.kill()
    assert _kernel_objects(proc.pid) == []


@needs_root
def test_after_sigkill_down_removes_the_leftovers_and_their_processes() -> None:
    """A testbed owner SIGKILLed leaves its silos (and a process in one); `down` removes
    them all, and the next start would do the same."""
    with subprocess.Popen([*TESTBED, "up", "hetero", "--silos", "2"], cwd=ROOT,
                          stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while b"testbed up" not in (line := proc.stdout.readline()):
            assert line, "the testbed exited before it was up"
        orphan = subprocess.Popen(["ip", "netns", "exec", f"{netns.PREFIX}{proc.pid}n0",
                                   "sleep", "600"], start_new_session=True)
        proc.kill()
    assert len(_kernel_objects(proc.pid)) == 4
    done = subprocess.run([*TESTBED, "down"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert f"{netns.PREFIX}{proc.pid}n0" in done.stdout
    assert _kernel_objects(proc.pid) == []
    assert orphan.wait(30) == -signal.SIGKILL


@needs_root
def test_relay_adds_the_profile_round_trip_and_keeps_the_rate() -> None:
    """Through the relay a silo's round trip grows by about the profile's RTT and its upload
    stays near the kernel's rate (the relay's own cost is what is left over)."""
    figures = measure(Profile("probe", 50.0, 30.0))
    assert 29.0 <= figures["relay_adds_rtt_ms"] <= 45.0
    assert 35.0 <= figures["direct"]["upload_mbit_s"] <= 52.0
    assert figures["relay_throughput_ratio"] >= 0.75


def test_without_root_the_cli_says_so_and_changes_nothing() -> None:
    """Run as another user, `up` exits 2 with a message naming root."""
    if os.geteuid() != 0:
        done = subprocess.run([*TESTBED, "up", "wan"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, check=False)
    else:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and no setpriv to drop privileges with")
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               *TESTBED, "up", "wan"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, check=False,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2, done.stderr
    assert "needs root" in done.stderr


@needs_root
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_pwfl_run_crosses_the_silos_links_with_emulated_devices(tmp_path: Path) -> None:
    """A one-slot run over two silos finishes; its models and updates cross the shaped links
    (bytes both ways) and every training call is padded to the silo's device time."""
    with Testbed(PROFILES["hetero"], silos=2) as bed:
        redis = bed.start_redis(tmp_path / "redis")
        run = silos.run_pwfl(bed, redis, ["--runs-dir", str(tmp_path), "--task", "synthetic",
                                          "--slots", "1", "--rounds", "2", "--local-steps", "4",
                                          "--no-progress", "--http-port", "0"],
                             "tb-e2e", tmp_path / "tb-e2e", step_s=0.05)
    assert run.exit_code == 0, (tmp_path / "tb-e2e" / "coordinator.console.log").read_text()
    assert run.link["download_bytes"] > 0
    assert run.link["upload_bytes"] > 0
    assert run.emulation.calls == 4  # 2 silos x 2 rounds
    assert run.emulation.padded_s > 0


def test_perturbed_noop_updates_differ_from_the_model_and_between_clients() -> None:
    """The throughput task's 'training' changes the state (so its update is uploaded, not
    found stored by digest), differently per client, and counts the job's steps."""
    import torch

    from bench.testbed.tasks import PerturbedNoopTask
    from trainer_worker.task import TrainConfig

    task = PerturbedNoopTask(model="mlp")
    before = task.build_model(0).state_dict()
    states = []
    for client in ("0", "1"):
        model = task.build_model(0)
        outcome = task.train(model, client, TrainConfig(max_steps=40, batch_size=32),
                             torch.device("cpu"))
        states.append(model.state_dict())
        assert outcome.num_examples == 40 * 32
    first = next(iter(before))
    assert not torch.equal(states[0][first], before[first])
    assert not torch.equal(states[0][first], states[1][first])


def test_profiles_give_every_silo_its_clients_and_devices() -> None:
    """Six clients in every profile; wan-3x2 puts two on each of three silos, hetero gives
    its silos slowdowns 1,1,1,2,4,4 (set up nothing: no root needed)."""
    assert {p.clients for p in PROFILES.values()} == {6}
    shared = Testbed(PROFILES["wan-3x2"])
    assert [s.clients for s in shared.silos] == [(0, 1), (2, 3), (4, 5)]
    assert shared.clients == 6
    hetero = Testbed(PROFILES["hetero"])
    assert [s.emulate_device(0.05) for s in hetero.silos][3:] == [
        "step_s=0.05,slowdown=2", "step_s=0.05,slowdown=4", "step_s=0.05,slowdown=4"]
