"""The kernel side of the testbed: network namespaces, veth pairs, tbf shaping, counters.

Every name the testbed makes starts with `PREFIX` and carries its owner's pid
(`pwtb<pid>n<i>` namespace, `pwtb<pid>h<i>` host end, `pwtb<pid>s<i>` silo end),
so leftovers of an owner that died (SIGKILL) are found by name and removed by the
next testbed that starts, or by `python -m bench.testbed down`. Deleting a host
end deletes its peer and both qdiscs; deleting a namespace kills nothing, so the
processes inside one are killed first (`ip netns pids`).

Shaping is `tbf` on both ends of each veth (this kernel has `tbf` and `htb`, not
`netem`): the host end's egress is the silo's download, the silo end's egress its
upload.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "pwtb"
_OWNED = re.compile(rf"^{PREFIX}(\d+)([nhs])(\d+)$")
IP_TIMEOUT_S = 30.0
MAX_SILOS = 16
# tbf: a bucket that holds a few GSO super-packets (veth offloads up to 64 KiB) or 2 ms of
# the rate, whichever is more; queued bytes beyond 50 ms of the rate are dropped.
TBF_MIN_BURST_BYTES = 256 * 1024
TBF_LATENCY_MS = 50


class TestbedError(RuntimeError):
    """The testbed could not be set up (no root, no `ip`/`tc`, a command failed)."""

    __test__ = False  # not a pytest class, despite the name


@dataclass(frozen=True)
class SiloLink:
    """Silo `index` of owner `owner_pid`: its namespace, veth ends and /30 addresses."""

    owner_pid: int
    index: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < MAX_SILOS:
            raise TestbedError(f"a testbed holds at most {MAX_SILOS} silos, not silo {self.index}")

    @property
    def netns(self) -> str:
        return f"{PREFIX}{self.owner_pid}n{self.index}"

    @property
    def host_link(self) -> str:
        return f"{PREFIX}{self.owner_pid}h{self.index}"

    @property
    def silo_link(self) -> str:
        return f"{PREFIX}{self.owner_pid}s{self.index}"

    def _subnet(self) -> str:
        """10.X.Y.0/30 with X, Y from the owner's pid and the index: 800 owners can hold
        up to `MAX_SILOS` silos each at once without sharing an address."""
        owner = self.owner_pid % 800
        return f"10.{200 + owner % 50}.{(owner // 50) * MAX_SILOS + self.index}"

    @property
    def host_address(self) -> str:
        return f"{self._subnet()}.1"

    @property
    def silo_address(self) -> str:
        return f"{self._subnet()}.2"


def run(*argv: str, netns: str | None = None) -> str:
    """Run `ip`/`tc` (in `netns` if given); its stdout. TestbedError with stderr on failure."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    try:
        done = subprocess.run(full, capture_output=True, text=True, timeout=IP_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TestbedError(f"{' '.join(full)}: {exc}") from exc
    if done.returncode != 0:
        raise TestbedError(f"{' '.join(full)}: {done.stderr.strip()}")
    return done.stdout


def require_root() -> None:
    """TestbedError unless this process may make namespaces (root and `ip`, `tc` at hand)."""
    if os.geteuid() != 0:
        raise TestbedError("the testbed needs root (network namespaces, veth pairs and tc "
                           "shaping); run it as root, e.g. with sudo")
    for tool in ("ip", "tc"):
        try:
            subprocess.run([tool, "-V"], capture_output=True, timeout=IP_TIMEOUT_S, check=False)
        except OSError as exc:
            raise TestbedError(f"the testbed needs `{tool}` (iproute2): {exc}") from exc


def create(link: SiloLink) -> None:
    """The namespace, the veth pair between it and the host, addresses, links up."""
    run("ip", "netns", "add", link.netns)
    run("ip", "link", "add", link.host_link, "type", "veth", "peer", "name", link.silo_link)
    run("ip", "link", "set", link.silo_link, "netns", link.netns)
    run("ip", "addr", "add", f"{link.host_address}/30", "dev", link.host_link)
    run("ip", "link", "set", link.host_link, "up")
    run("ip", "addr", "add", f"{link.silo_address}/30", "dev", link.silo_link, netns=link.netns)
    run("ip", "link", "set", link.silo_link, "up", netns=link.netns)
    run("ip", "link", "set", "lo", "up", netns=link.netns)


def tbf_args(rate_mbit: float) -> list[str]:
    """`tc qdisc add ... tbf` arguments for `rate_mbit` (bucket and queue as above)."""
    rate_bytes_s = rate_mbit * 1e6 / 8
    burst = max(TBF_MIN_BURST_BYTES, int(rate_bytes_s * 0.002))
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst),
            "latency", f"{TBF_LATENCY_MS}ms"]


def shape(link: SiloLink, rate_mbit: float) -> None:
    """Both directions of the link limited to `rate_mbit` by the kernel (tbf)."""
    run("tc", "qdisc", "replace", "dev", link.host_link, "root", *tbf_args(rate_mbit))
    run("tc", "qdisc", "replace", "dev", link.silo_link, "root", *tbf_args(rate_mbit),
        netns=link.netns)


def kill_inside(netns: str) -> int:
    """SIGKILL every process in `netns`; how many there were."""
    try:
        pids = [int(p) for p in run("ip", "netns", "pids", netns).split()]
    except TestbedError:
        return 0
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def remove(link: SiloLink) -> None:
    """The silo's processes killed, its link and namespace deleted (what exists of them)."""
    kill_inside(link.netns)
    with contextlib.suppress(TestbedError):
        run("ip", "link", "del", link.host_link)  # its peer and both qdiscs go with it
    with contextlib.suppress(TestbedError):
        run("ip", "netns", "del", link.netns)


def owned() -> list[SiloLink]:
    """Every silo that a testbed made and that still has a namespace or a host link."""
    names = [ns["name"] for ns in json.loads(run("ip", "-j", "netns", "list") or "[]")]
    names += [ln["ifname"] for ln in json.loads(run("ip", "-j", "link", "show") or "[]")]
    found = {(int(m[1]), int(m[3])) for m in map(_OWNED.match, names) if m}
    return [SiloLink(pid, index) for pid, index in sorted(found) if index < MAX_SILOS]


def remove_leftovers(*, include_live: bool = False) -> list[SiloLink]:
    """Remove the silos of owners that died (all of them with `include_live`); those removed."""
    from bus.handoff import pid_alive  # here: the no-root path of the CLI imports no bus

    gone = [s for s in owned() if include_live or not pid_alive(s.owner_pid)]
    for silo in gone:
        remove(silo)
    return gone


def link_counters(link: SiloLink) -> dict[str, Any]:
    """Bytes each way (the host end's device counters: its tx is the silo's download, its rx
    the upload, whatever the qdisc) and the qdiscs' drops."""
    host = _qdisc(link.host_link, None)
    silo = _qdisc(link.silo_link, link.netns)
    return {"silo": link.index, "download_bytes": _device_bytes(link.host_link, "tx"),
            "upload_bytes": _device_bytes(link.host_link, "rx"),
            "download_drops": host.get("drops", 0),
            "upload_drops": silo.get("drops", 0), "download_qdisc": host.get("kind", "-"),
            "upload_qdisc": silo.get("kind", "-")}


def _device_bytes(dev: str, direction: str) -> int:
    try:
        return int(Path(f"/sys/class/net/{dev}/statistics/{direction}_bytes").read_text())
    except (OSError, ValueError):
        return 0


def _qdisc(dev: str, netns: str | None) -> dict[str, Any]:
    try:
        rows = json.loads(run("tc", "-s", "-j", "qdisc", "show", "dev", dev, netns=netns)
                          or "[]")
    except (TestbedError, json.JSONDecodeError):
        return {}
    return next((r for r in rows if r.get("root")), rows[0] if rows else {})


def qdisc_text(link: SiloLink) -> str:
    """`tc -s qdisc show` of both ends, as an operator reads it."""
    host = run("tc", "-s", "qdisc", "show", "dev", link.host_link)
    silo = run("tc", "-s", "qdisc", "show", "dev", link.silo_link, netns=link.netns)
    return (f"# host end {link.host_link} (egress = download to silo {link.index})\n{host}"
            f"# silo end {link.silo_link} in {link.netns} (egress = upload)\n{silo}")
