"""The live dashboard in a real headless Chromium against a real run: charts fill while the run
goes, a page whose connection drops shows it and recovers, a page opened mid-run agrees, and
the final state stays after the end. And against a served state fed events by hand (no run):
validation and test series drawn and labelled apart, rounds aggregated and the evaluation lag
on each slot's card, and no busy fraction above 100%.

Screenshots go to $PWFL_SCREENSHOT_DIR (else the test's tmp dir); their paths are printed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bus.embedded import EmbeddedRedis
from coordinator.http import StatusServer
from coordinator.observability import Observability
from coordinator.status import RunStatus, SlotStatus
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
  && chart !== null
  && chart.series.filter(s => / test$/.test(s.label)).length === slots"""


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


def _fed_events(t0: float) -> list[dict[str, Any]]:
    """Two slots, three rounds each: leases, overlapping folds and aggregations, both slots'
    evaluations queued on the one evaluation thread, and each round's validation."""
    events: list[dict[str, Any]] = [{"event": "run_started", "slots": 2, "rounds": 6,
                                     "task": "synthetic", "strategy": "fedavg", "ts": t0}]
    for slot in (0, 1):
        for r in (1, 2, 3):
            t = t0 + 1 + 4 * (r - 1) + slot * 0.5
            ids = {"slot_id": slot, "round": r}
            events += [
                {"event": "lease_taken", "client_id": str(slot), "ts": t, **ids},
                {"event": "lease_returned", "client_id": str(slot), "reason": "result",
                 "ts": t + 3, **ids},
                {"event": "validation_finished", "slot_id": slot, "round": r - 1,
                 "during_round": r, "accuracy": 0.4 + 0.1 * r + 0.02 * slot, "loss": 1.0,
                 "num_examples": 100, "clients": 1, "ts": t + 3.1},
                {"event": "update_folded", "duration_s": 2.0, "ts": t + 3.2, **ids},
                {"event": "aggregation_finished", "duration_s": 3.0, "ts": t + 3.4, **ids},
                # queued behind the other slot's: duration_s includes the wait
                {"event": "evaluation_finished", "accuracy": 0.35 + 0.1 * r + 0.03 * slot,
                 "duration_s": 3.0 + slot, "ts": t + 3.5 + slot, **ids},
            ]
    return sorted(events, key=lambda e: e["ts"])


async def test_validation_and_test_are_drawn_apart_and_busy_stays_under_100(
        browser: Any, tmp_path: Path) -> None:
    """Fed by hand: each slot has a "test" and a dashed "validation" series, legend labelled;
    a later validation point arrives live; cards count rounds aggregated and show the lag;
    every busy bar reads at most 100% though the evaluations overlap the rounds' work."""
    t0 = time.time() - 30
    status = RunStatus("fed", started_at=t0)
    obs = Observability(status, lambda: status.as_dict({}))
    server = StatusServer(lambda: status.as_dict({}), "127.0.0.1", 0, observability=obs)
    for slot in (0, 1):
        status.slots[slot] = SlotStatus(slot, rounds=6, state="training")
        for r in (1, 2, 3):
            status.slots[slot].record_aggregated(r)
            status.slots[slot].record_validation(r - 1, 0.4 + 0.1 * r, 1.0 * r)
        status.slots[slot].record_evaluated(1)
        status.slots[slot].record_accuracy(1, 0.45, 5.0)
    url = await server.start()
    try:
        for event in _fed_events(t0):
            obs._observe(event)
        page = await browser.new_page(viewport={"width": 1400, "height": 1000})
        await page.goto(url)
        labels = ["slot 0 test", "slot 0 validation", "slot 1 test", "slot 1 validation"]
        await page.wait_for_function(
            "(labels) => typeof chart !== 'undefined' && chart !== null && "
            "JSON.stringify(chart.series.slice(1).map(s => s.label)) === JSON.stringify(labels)",
            arg=labels, timeout=30_000)
        obs._observe({"event": "validation_finished", "slot_id": 0, "round": 3,
                      "during_round": 4, "accuracy": 0.9, "ts": t0 + 20})
        await page.wait_for_function("() => (S.validation['0'] || []).length === 4",
                                     timeout=30_000)
        shots = _screenshot_dir(tmp_path)
        await page.screenshot(path=shots / "dashboard-validation.png", full_page=True)
        print(f"validation screenshot: {shots / 'dashboard-validation.png'}")  # noqa: T201
        seen = await page.evaluate("""() => ({
            legend: document.querySelector('.u-legend').textContent,
            dashed: chart.series.slice(1).map(s => !!s.dash),
            cards: [...document.querySelectorAll('#slots .slot')].map(e => e.textContent),
            busy: [...document.querySelectorAll('#busy .bar')].map(e => [
                e.querySelector('span').textContent, e.querySelector('.num').textContent])})""")
    finally:
        await server.stop()
    assert "validation" in seen["legend"]
    assert "test" in seen["legend"]
    assert seen["dashed"] == [False, True, False, True]
    for card in seen["cards"]:
        assert "3 of 6 rounds aggregated" in card
        assert "evaluation lag 2 rounds" in card
        assert "validation" in card
        assert "test" in card
    names = [name for name, _ in seen["busy"]]
    assert "evaluation thread" in names
    assert "coordinator: rounds" in names
    shares = [float(value.rstrip("%")) for _, value in seen["busy"]]
    assert len(shares) >= 4
    assert all(0 <= share <= 100 for share in shares), seen["busy"]
