"""Latency for the testbed's links: a delaying TCP relay per silo, on the host side.

This kernel has no `netem`, so no qdisc can delay packets. Instead every service a
silo reaches on the host (Redis, Flower's SuperLink) is offered to it at the host
end of its veth (`host_address:port`) by a relay that forwards each chunk it reads
to the real service on loopback only once the one-way delay (half the profile's
RTT) has passed since it was read, in both directions. Bandwidth stays with the
kernel's `tbf` on the veth, which the bytes cross before (upload) or after
(download) the relay.

What it emulates: every request and every reply arrives one-way-delay late, and a
stream keeps its rate (the reader goes on reading while earlier chunks wait: the
delay is a pipe, not stop-and-wait). What it does not: TCP's own window and
slow-start see the short veth round trip, not the emulated one, so transfers ramp
up faster than over a real long link of that RTT. A bounded queue per direction
(`QUEUE_CHUNKS`) pushes back on the sender instead of buffering without limit.

The relay runs on its own event loop in a daemon thread (`RelayThread`), so it
stops with the process that owns the testbed, however that process ends. That thread
blocks the signals that unwind a testbed, so the kernel hands them to the main thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from bench.testbed.signals import block_in_worker_thread

CHUNK_BYTES = 256 * 1024
QUEUE_CHUNKS = 256  # per direction of one connection: at most 64 MiB held
START_TIMEOUT_S = 10.0
T = TypeVar("T")


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay_s: float) -> None:
    """Copy reader to writer, each chunk written `delay_s` after it was read; EOF likewise."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=QUEUE_CHUNKS)

    async def read() -> None:
        while chunk := await reader.read(CHUNK_BYTES):
            await queue.put((loop.time() + delay_s, chunk))
        await queue.put((loop.time() + delay_s, b""))

    async def write() -> None:
        while True:
            due, chunk = await queue.get()
            if (wait_s := due - loop.time()) > 0:
                await asyncio.sleep(wait_s)  # the emulated propagation delay itself
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()

    async with asyncio.TaskGroup() as group:
        group.create_task(read())
        group.create_task(write())


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


class DelayRelay:
    """Listens on (host, port); each connection is forwarded to `target` with `delay_s`
    added each way."""

    def __init__(self, host: str, port: int, target: tuple[str, int], delay_s: float) -> None:
        self.host, self.port, self.target, self.delay_s = host, port, target, delay_s
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # a connection callback always runs in a task
        self._connections.add(task)
        try:
            service_r, service_w = await asyncio.open_connection(*self.target)
        except OSError:
            self._connections.discard(task)
            await _close(client_w)
            return
        _nodelay(client_w)
        _nodelay(service_w)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(_pump(client_r, service_w, self.delay_s))
                group.create_task(_pump(service_r, client_w, self.delay_s))
        except* (OSError, asyncio.IncompleteReadError):
            pass  # one side went away: the connection is over for both
        finally:
            self._connections.discard(task)
            await _close(client_w)
            await _close(service_w)


class RelayThread:
    """An event loop in a daemon thread holding the testbed's relays."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="testbed-relay", daemon=True)
        self._relays: list[DelayRelay] = []
        self._thread.start()

    def _run(self) -> None:
        block_in_worker_thread()  # bench.testbed.signals: they go to the main thread
        self._loop.run_forever()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(START_TIMEOUT_S)

    def add(self, host: str, port: int, target: tuple[str, int], delay_s: float) -> DelayRelay:
        """A relay listening on (host, port) to `target`, started."""
        relay = DelayRelay(host, port, target, delay_s)
        self._call(relay.start())
        self._relays.append(relay)
        return relay

    def stop(self) -> None:
        """Every relay closed, the loop stopped and the thread joined."""
        if not self._thread.is_alive():
            return
        for relay in self._relays:
            with contextlib.suppress(Exception):
                self._call(relay.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(START_TIMEOUT_S)
        self._loop.close()
