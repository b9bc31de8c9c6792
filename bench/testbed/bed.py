"""`Testbed`: emulated silos up for the length of a `with` block, gone on every exit path.

    with Testbed(profile("wan")) as bed:
        redis = bed.start_redis()                 # on the host, reached by silos via relays
        agent = bed.popen(bed.silos[0], [...])    # a process inside silo 0's namespace
        bed.counters()                            # bytes each way per link, drops

On the way in, leftovers of testbeds whose owner died are removed; on the way out
(return, exception, Ctrl-C, SIGTERM or SIGHUP, which are turned into exceptions while
the bed is up) every process it started is stopped, the relays closed and every
namespace, link and qdisc deleted. A SIGKILL leaves them to the next start or to
`python -m bench.testbed down`; processes it started die with it (parent-death
signal), and those they started are killed with their namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.testbed import netns
from bench.testbed.profiles import Profile
from bench.testbed.relay import RelayThread
from bench.testbed.signals import signals_unwind

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 10.0
POLL_S = 1.0  # Popen.wait(timeout) itself polls every 50 ms at most
REDIS_START_S = 20.0
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Silo:
    """One emulated silo: its namespace and link, and its device's slowdown."""

    link: netns.SiloLink
    slowdown: float
    clients: tuple[int, ...]  # the client (partition) ids this silo hosts

    @property
    def index(self) -> int:
        return self.link.index

    def emulate_device(self, step_s: float) -> str:
        """The `client_agent --emulate-device` value for this silo's device."""
        return f"step_s={step_s:g},slowdown={self.slowdown:g}"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Testbed:
    """The silos of `profile` (or its first `silos`), owned by this process."""

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, profile: Profile, *, silos: int | None = None) -> None:
        self.profile = profile
        count = profile.silos if silos is None else silos
        k = profile.clients_per_silo
        self.silos = [Silo(netns.SiloLink(os.getpid(), i), profile.slowdowns[i % profile.silos],
                           tuple(range(i * k, (i + 1) * k))) for i in range(count)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self._relays: RelayThread | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Testbed:
        netns.require_root()
        self._stack.enter_context(signals_unwind())
        self._stack.callback(self._tear_down)
        try:
            netns.remove_leftovers()
            self._bring_up()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _bring_up(self) -> None:
        for silo in self.silos:
            netns.create(silo.link)
            if self.profile.rate_mbit is not None:
                netns.shape(silo.link, self.profile.rate_mbit)
        self._relays = RelayThread()

    def _tear_down(self) -> None:
        """Processes stopped, relays closed, namespaces and links deleted."""
        stop_processes(self.procs)
        if self._relays is not None:
            self._relays.stop()
        for silo in self.silos:
            netns.remove(silo.link)

    @property
    def clients(self) -> int:
        """Clients over all silos (client ids 0 .. clients-1)."""
        return sum(len(silo.clients) for silo in self.silos)

    def expose(self, port: int) -> list[str]:
        """`host:port` per silo, reaching 127.0.0.1:`port` through the silo's delaying relay."""
        assert self._relays is not None, "the testbed is not up"
        for silo in self.silos:
            self._relays.add(silo.link.host_address, port, ("127.0.0.1", port),
                             self.profile.one_way_delay_s)
        return [f"{silo.link.host_address}:{port}" for silo in self.silos]

    def popen(self, silo: Silo | None, argv: Sequence[str], **kwargs: Any
              ) -> subprocess.Popen[bytes]:
        """`argv` started inside `silo`'s namespace (on the host if None), stopped at exit."""
        full = ["ip", "netns", "exec", silo.link.netns, *argv] if silo else list(argv)
        env = {**os.environ, "PYTHONPATH": str(ROOT), **kwargs.pop("env", {})}
        proc = subprocess.Popen(full, env=env, preexec_fn=_die_with_parent,
                                start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def start_redis(self, workdir: Path) -> tuple[str, list[str]]:
        """A redis-server on loopback for this bed; its host URL and each silo's URL."""
        from bus.embedded import find_redis_server, free_port

        port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        proc = self.popen(None, [find_redis_server(), "--bind", "127.0.0.1", "--port",
                                 str(port), "--save", "", "--appendonly", "no", "--dir",
                                 str(workdir), "--logfile", str(workdir / "redis.log")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(port, proc)
        return f"redis://127.0.0.1:{port}", [f"redis://{a}" for a in self.expose(port)]

    def counters(self) -> list[dict[str, Any]]:
        """Per silo: bytes each way over its link since it was made, and drops."""
        return [netns.link_counters(silo.link) for silo in self.silos]

    def qdisc_text(self, index: int = 0) -> str:
        return netns.qdisc_text(self.silos[index].link)


def wait(proc: subprocess.Popen[bytes]) -> int:
    """`proc`'s exit status, waited for in short polls: a signal that unwinds the bed is acted
    on within a poll. A plain `proc.wait()` blocks in waitpid(), which a signal handled just
    before it started (or by another thread) does not interrupt: the bed would stay up until
    `proc` exits by itself."""
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=POLL_S)


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process group, SIGKILL what is left after a grace, reap all."""
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Until 127.0.0.1:`port` accepts; TestbedError if `proc` exits or time runs out."""
    import socket

    deadline = time.monotonic() + REDIS_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise netns.TestbedError(f"redis-server exited {proc.returncode} at start")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        time.sleep(0.05)  # a listening socket offers nothing to await
    raise netns.TestbedError(f"redis-server not listening on {port} after {REDIS_START_S} s")
