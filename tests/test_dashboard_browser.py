"""The live dashboard in a real headless Chromium against a real run: charts fill while the run
goes, a page whose connection drops shows it and recovers, a page opened mid-run agrees, and
the final state stays after the end.

Screenshots go to $PWFL_SCREENSHOT_DIR (else the test's tmp dir); their paths are printed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bus.embedded import EmbeddedRedis
from tests.e2e import Run, start_coordinator

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
playwright_api = pytest.importorskip("playwright.async_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = os.path.exists(CHROMIUM)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SLOTS, ROUNDS = 3, 14
EVERY_SLOT_PLOTTED = """([slots, clientsPerSlot]) => typeof S !== 'undefined' && S !== null
  && S.status.slots.length === slots
  && S.status.slots.every(s => (S.accuracy[s.slot_id] || []).length >= 2)
  && S.status.slots.every(s => new Set(Object.entries(S.timeline).filter(([c, segs]) =>
       segs.some(g => g.slot === String(s.slot_id))).map(([c]) => c)).size >= clientsPerSlot)
  && document.querySelectorAll('#slots .slot').length === slots
  && chart !== null && chart.series.length === slots + 1"""


@pytest.fixture
async def proxy_to() -> AsyncIterator[Any]:
    """Makes DroppingProxy objects and closes them at the end."""
    proxies: list[DroppingProxy] = []

    async def make(target: str) -> DroppingProxy:
        proxies.append(DroppingProxy(target))
        await proxies[-1].start()
        return proxies[-1]

    yield make
    for proxy in proxies:
        await proxy.close()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not HAVE_CHROMIUM:
        pytest.skip("no chromium binary")
    async with playwright_api.async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        await b.close()


class DroppingProxy:
    """A TCP proxy in front of the coordinator that can cut every connection and refuse new
    ones for a while: the network dropping under a page, for real."""

    def __init__(self, target: str) -> None:
        parts = urllib.parse.urlsplit(target)
        self._host, self._port = parts.hostname or "", parts.port or 80
        self._writers: set[asyncio.StreamWriter] = set()
        self.refusing = False
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        self._writers |= {writer, up_writer}
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer),
                             return_exceptions=True)

    def drop(self) -> None:
        self.refusing = True
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


def _screenshot_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PWFL_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _url(run: Run) -> str:
    event = run.wait_for(lambda events: any(e["event"] == "http_listening" for e in events))
    return str(next(e for e in event if e["event"] == "http_listening")["url"])


async def _state(page: Any) -> dict[str, Any]:
    return dict(await page.evaluate("""() => ({final: S.final, state: S.status.state,
        points: Object.fromEntries(Object.entries(S.accuracy).map(([k, v]) => [k, v.length])),
        done: S.status.slots.map(s => s.rounds_done),
        banner: document.getElementById('banner').hidden ? '' :
                document.getElementById('banner').textContent})"""))


async def test_dashboard_live_then_final(redis_server: EmbeddedRedis, tmp_path: Path,
                                         browser: Any, proxy_to: Any) -> None:
    """Every slot gets accuracy points and timeline segments live; a second page opened
    mid-run shows the same; after the end the page shows 'finished' with the whole run."""
    shots = _screenshot_dir(tmp_path)
    run = start_coordinator(redis_server.url, tmp_path / "runs", "dash", "--task",
                            "tests.e2e_tasks:SlowClientTask", "--task-option", "base_s=0.4",
                            "--slots", str(SLOTS), "--clients", "6", "--rounds", str(ROUNDS),
                            "--local-agents", "2")
    with run:
        url = _url(run)
        proxy = await proxy_to(url)
        page = await browser.new_page(viewport={"width": 1400, "height": 1000})
        await page.goto(proxy.url)
        await page.wait_for_function(EVERY_SLOT_PLOTTED, arg=[SLOTS, 2], timeout=150_000)
        await page.screenshot(path=shots / "dashboard-mid-run.png", full_page=True)
        print(f"mid-run screenshot: {shots / 'dashboard-mid-run.png'}")  # noqa: T201
        proxy.drop()  # the network goes: the page says so and keeps what it has
        await page.wait_for_function("() => connection === 'lost' && !document.getElementById("
                                     "'banner').hidden", timeout=30_000)
        await page.screenshot(path=shots / "dashboard-connection-lost.png", full_page=True)
        print(f"connection lost: {shots / 'dashboard-connection-lost.png'}")  # noqa: T201
        proxy.refusing = False  # back: EventSource reconnects and starts from a snapshot
        await page.wait_for_function("() => connection === 'live'", timeout=30_000)
        late_page = await browser.new_page(viewport={"width": 1400, "height": 1000})
        await late_page.goto(url)  # opened mid-run: starts from the snapshot
        await late_page.wait_for_function(EVERY_SLOT_PLOTTED, arg=[SLOTS, 2], timeout=30_000)
        assert await asyncio.to_thread(run.wait, 200) == 0, run.output()[-3000:]
        for p in (page, late_page):
            await p.wait_for_function("() => S.final && !document.getElementById('banner').hidden",
                                      timeout=30_000)
        await page.screenshot(path=shots / "dashboard-final.png", full_page=True)
        print(f"final screenshot: {shots / 'dashboard-final.png'}")  # noqa: T201
        evaluations = run.events("evaluation_finished")
    expected = {str(s): sum(1 for e in evaluations if e["slot_id"] == s) for s in range(SLOTS)}
    for p in (page, late_page):
        state = await _state(p)
        assert state["final"]
        assert state["state"] == "finished"
        assert state["done"] == [ROUNDS] * SLOTS
        assert state["points"] == expected
        assert "finished" in state["banner"]
