"""What the delaying relay adds: round trips and throughput from inside a silo, direct
and through the relay, over the same shaped veth.

On the host, a probe server listens twice: on the host end of silo 0's link (the
direct path) and on loopback behind the silo's relay. A client inside the silo's
namespace (`python -m bench.testbed.measure --client ...`) times `PINGS` 64-byte
round trips and one upload of `UPLOAD_MB` on each path. With a profile's RTT r,
the relay path should show r more per round trip than the direct one and the same
throughput (the rate is the kernel's); what it shows beyond that is the relay's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from bench.testbed.bed import Testbed
from bench.testbed.profiles import Profile
from bench.testbed.signals import block_in_worker_thread

PINGS = 50
UPLOAD_MB = 8
PING = b"p"
SINK = b"s"


async def _probe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """'p': echo 64-byte messages until EOF; 's': read to EOF, then answer one byte."""
    mode = await reader.readexactly(1)
    if mode == PING:
        while message := await reader.read(64):
            writer.write(message)
            await writer.drain()
    else:
        while await reader.read(1 << 20):
            pass
        writer.write(b"k")
        await writer.drain()
    writer.close()


def _serve(endpoints: list[tuple[str, int]], ready: threading.Event) -> None:
    block_in_worker_thread()
    async def main() -> None:
        servers = [await asyncio.start_server(_probe, host, port) for host, port in endpoints]
        ready.set()
        await asyncio.gather(*(s.serve_forever() for s in servers))

    asyncio.run(main())


def client(host: str, port: int) -> dict[str, float]:
    """Run inside the silo: median round trip (ms) and upload rate (Mbit/s) to host:port."""
    with socket.create_connection((host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(PING)
        rtts = []
        for _ in range(PINGS):
            began = time.perf_counter()
            sock.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(sock.recv(64 - got))
            rtts.append((time.perf_counter() - began) * 1000)
    block = b"\0" * (1 << 20)
    with socket.create_connection((host, port)) as sock:
        began = time.perf_counter()
        sock.sendall(SINK)
        for _ in range(UPLOAD_MB):
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)
        seconds = time.perf_counter() - began
    return {"rtt_ms": statistics.median(rtts), "upload_mbit_s": UPLOAD_MB * 8.388608 / seconds}


def measure(profile: Profile) -> dict[str, Any]:
    """Direct and relayed figures from silo 0 of a one-silo bed of `profile`."""
    from bus.embedded import free_port

    with Testbed(profile, silos=1) as bed:
        silo = bed.silos[0]
        relay_port, direct_port = free_port(), free_port()
        ready = threading.Event()
        threading.Thread(target=_serve, daemon=True, name="probe",
                         args=([("127.0.0.1", relay_port),
                                (silo.link.host_address, direct_port)], ready)).start()
        ready.wait(10)
        bed.expose(relay_port)
        out: dict[str, Any] = {"profile": profile.name, "emulated_rtt_ms": profile.rtt_ms}
        for path, port in (("direct", direct_port), ("relay", relay_port)):
            proc = bed.popen(silo, [sys.executable, "-m", "bench.testbed.measure", "--client",
                                    f"{silo.link.host_address}:{port}"], stdout=subprocess.PIPE)
            stdout, _ = proc.communicate(timeout=120)
            out[path] = json.loads(stdout)
        out["relay_adds_rtt_ms"] = out["relay"]["rtt_ms"] - out["direct"]["rtt_ms"]
        out["relay_overhead_rtt_ms"] = out["relay_adds_rtt_ms"] - profile.rtt_ms
        out["relay_throughput_ratio"] = (out["relay"]["upload_mbit_s"]
                                         / out["direct"]["upload_mbit_s"])
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.testbed.measure")
    p.add_argument("--client", required=True, metavar="HOST:PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    host, port = args.client.rsplit(":", 1)
    print(json.dumps(client(host, int(port))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
