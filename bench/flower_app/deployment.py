"""Flower 1.41's deployment engine on one machine, started as a Flower user would.

One `flower-superlink --insecure` and one `flower-supernode --insecure` per client,
each SuperNode with `--node-config "partition-id=N num-partitions=6"` and its own
ClientAppIo (Runtime API) port, all on free loopback ports; then
`flwr run <app dir> <connection> --stream --run-config ...` against the SuperLink's
Control API, through a Flower configuration (`FLWR_HOME/config.toml`) that names
the SuperLink. Every process is started in its own session (process group);
`Federation.stop` ends the groups and the processes Flower detached from them (its
SuperExec and app processes): SIGTERM, then SIGKILL after a grace, on every exit path
the bench lives through (return, exception, Ctrl-C, SIGTERM). If the bench itself is
SIGKILLed, a parent-death signal kills the SuperLink and SuperNodes at once; Flower's
SuperExec and app processes watch their parent and leave on their own (seen: SuperExecs
within seconds, a ServerApp process after about 40 s of retries).

On the testbed (`bench/testbed`, `Plan.silos`), SuperNode i runs inside silo i's
network namespace (`ip netns exec`), reaches the SuperLink through the silo's shaped
link and delaying relay, serves its Runtime API on the silo's own address, and its
ClientApp processes inherit the silo's emulated device (`PWFL_EMULATED_DEVICE`).

Flower's defaults are kept (subprocess isolation: each SuperNode's SuperExec starts
a `flwr-clientapp` process per message, the SuperLink's starts the `flwr-serverapp`)
except one: the SuperLink's runtime dependency installation (`uv sync` of the app's
dependencies into a fresh environment) is turned off, because it needs a package
index and this bench runs offline; the app uses the installed flwr and torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]
EMULATION_ENV = "PWFL_EMULATED_DEVICE"  # trainer_worker.emulation.ENV, read by the ClientApp
APP_DIR = Path(__file__).resolve().parent / "app"
CONNECTION = "pwfl-bench"  # the SuperLink connection's name in FLWR_HOME/config.toml
START_TIMEOUT_S = 90.0
STOP_GRACE_S = 10.0
PR_SET_PDEATHSIG = 1


class FlowerProcessError(RuntimeError):
    """A Flower process did not start, or the run failed; the message has its log tail."""


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports free right now (held open together while chosen)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def toml_value(value: bool | int | float | str) -> str:
    """A run-config value as TOML (`flwr run --run-config KEY=VALUE` parses TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for the paths and labels used here
    return repr(value)


@dataclass(frozen=True)
class SiloNode:
    """Where one SuperNode runs on the testbed: its namespace, the relayed SuperLink address
    it dials, its own address, and its emulated device (`client_agent --emulate-device`)."""

    netns: str
    superlink: str
    host: str
    emulate_device: str


@dataclass(frozen=True)
class Plan:
    """Where everything goes: ports, FLWR_HOME and logs, and the executables."""

    superlink_port: int
    supernode_ports: tuple[int, ...]
    home: Path
    bin_dir: Path = field(default_factory=lambda: Path(sys.executable).parent)
    silos: tuple[SiloNode, ...] = ()  # testbed: one per partition; empty: all on loopback

    @classmethod
    def on_free_ports(cls, nodes: int, home: Path) -> Plan:
        ports = free_ports(nodes + 1)
        return cls(ports[0], tuple(ports[1:]), home)

    @property
    def superlink_address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"

    def superlink_argv(self) -> list[str]:
        return [str(self.bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                "--port", str(self.superlink_port),
                "--disable-runtime-dependency-installation"]

    def supernode_host(self, partition: int) -> str:
        return self.silos[partition].host if self.silos else "127.0.0.1"

    def supernode_argv(self, partition: int) -> list[str]:
        silo = self.silos[partition] if self.silos else None
        argv = [str(self.bin_dir / "flower-supernode"), "--insecure",
                "--superlink", silo.superlink if silo else self.superlink_address,
                "--host", self.supernode_host(partition),
                "--port", str(self.supernode_ports[partition]), "--node-config",
                f"partition-id={partition} num-partitions={len(self.supernode_ports)}"]
        return ["ip", "netns", "exec", silo.netns, *argv] if silo else argv

    def flwr_run_argv(self, run_config: dict[str, bool | int | float | str],
                      app_dir: Path = APP_DIR) -> list[str]:
        overrides = [f"{key}={toml_value(value)}" for key, value in run_config.items()]
        return [str(self.bin_dir / "flwr"), "run", str(app_dir), CONNECTION, "--stream",
                "--run-config", " ".join(overrides)]

    def flower_config_toml(self) -> str:
        """FLWR_HOME/config.toml: the SuperLink connection `flwr run` submits to."""
        return (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                f'address = "{self.superlink_address}"\ninsecure = true\n')

    def env(self) -> dict[str, str]:
        """The processes' environment: Flower's executables and PWFL found, Flower home here,
        no phoning home."""
        path = f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"  # flower-superexec
        return {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT), "FLWR_HOME": str(self.home),
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """SIGKILL, not SIGTERM: on SIGTERM the SuperLink's uvicorn waits for its connections
    to close, which its ServerApp process keeps open (seen: still up 50 s after)."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _proc_stats() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of live processes, from /proc."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":  # a zombie has exited; only its reaping is left
                stats[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return stats


def _descendants(pid: int) -> list[tuple[int, int]]:
    """Every descendant of `pid` as (pid, start time), detached sessions included."""
    stats = _proc_stats()
    found: list[tuple[int, int]] = []
    frontier = {pid}
    while frontier:
        kids = {p for p, (parent, _) in stats.items() if parent in frontier}
        found += [(p, stats[p][1]) for p in kids]
        frontier = kids
    return found


def log_tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return text[-chars:]


class Federation:
    """A SuperLink and one SuperNode per partition, started together and stopped together."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        self._logs: list[IO[bytes]] = []

    def __enter__(self) -> Federation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, argv: list[str], name: str, env: dict[str, str] | None = None
               ) -> subprocess.Popen[bytes]:
        log = self.plan.home / f"{name}.log"
        handle = log.open("wb")
        self._logs.append(handle)
        proc = subprocess.Popen(argv, cwd=ROOT, env={**self.plan.env(), **(env or {})},
                                stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
        self.procs.append((proc, log))
        return proc

    def start(self) -> None:
        self.plan.home.mkdir(parents=True, exist_ok=True)
        (self.plan.home / "config.toml").write_text(self.plan.flower_config_toml())
        superlink = self._spawn(self.plan.superlink_argv(), "superlink")
        _wait_for_port(self.plan.superlink_port, superlink, self.plan.home / "superlink.log")
        for partition, port in enumerate(self.plan.supernode_ports):
            device = ({EMULATION_ENV: self.plan.silos[partition].emulate_device}
                      if self.plan.silos else {})
            node = self._spawn(self.plan.supernode_argv(partition), f"supernode-{partition}",
                               device)
            _wait_for_port(port, node, self.plan.home / f"supernode-{partition}.log",
                           self.plan.supernode_host(partition))

    def stop(self) -> None:
        """SIGTERM every group and detached descendant; SIGKILL what is left after a grace."""
        detached = [d for proc, _ in self.procs for d in _descendants(proc.pid)]
        for proc, _ in self.procs:
            _signal_group(proc.pid, signal.SIGTERM)
        _signal_same(detached, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        while _alive(detached) and time.monotonic() < deadline:
            time.sleep(0.1)  # detached processes are not our children: nothing to wait on
        _signal_same(detached, signal.SIGKILL)
        for handle in self._logs:
            handle.close()
        self.procs, self._logs = [], []

    def run(self, run_config: dict[str, bool | int | float | str], timeout_s: float) -> Path:
        """`flwr run` the app with this run config, waiting until the run ends; its log."""
        log = self.plan.home / "flwr-run.log"
        with log.open("wb") as handle:
            try:
                done = subprocess.run(self.plan.flwr_run_argv(run_config), cwd=ROOT,
                                      env=self.plan.env(), stdout=handle,
                                      stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
            except subprocess.TimeoutExpired:
                raise FlowerProcessError(self.failure(f"flwr run still going after "
                                                      f"{timeout_s:.0f} s", log)) from None
        if done.returncode != 0:
            raise FlowerProcessError(self.failure(f"flwr run exited {done.returncode}", log))
        return log

    def failure(self, what: str, log: Path) -> str:
        """`what`, with the tails of `log` and the SuperLink's log."""
        return (f"{what}\n--- {log.name} ---\n{log_tail(log)}\n--- superlink.log ---\n"
                f"{log_tail(self.plan.home / 'superlink.log', 2000)}")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _alive(procs: list[tuple[int, int]]) -> bool:
    stats = _proc_stats()
    return any(stats.get(pid, (0, -1))[1] == started for pid, started in procs)


def _signal_same(procs: list[tuple[int, int]], sig: signal.Signals) -> None:
    """Signal each (pid, start time) still alive as that same process (not a reused pid)."""
    stats = _proc_stats()
    for pid, started in procs:
        if stats.get(pid, (0, -1))[1] == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path,
                   host: str = "127.0.0.1") -> None:
    """Until host:`port` accepts; FlowerProcessError if `proc` exits or time runs out."""
    name, deadline = log.stem, time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerProcessError(f"{name} exited {proc.returncode} "
                                     f"before listening on {port}:\n{log_tail(log)}")
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.2)  # a process's listening socket offers nothing to await
    raise FlowerProcessError(f"{name} not listening on {port} after "
                             f"{START_TIMEOUT_S:.0f} s:\n{log_tail(log)}")
