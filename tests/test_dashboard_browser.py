"""The live dashboard in a real headless Chromium against a real run: charts fill while the run
goes, a page opened mid-run agrees with the first, and the final state stays after the end.

Screenshots go to $PWFL_SCREENSHOT_DIR (else the test's tmp dir); their paths are printed."""

from __future__ import annotations

import os
import shutil
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
  && document.querySelectorAll('#accuracy .u-series').length === slots + 1"""


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not HAVE_CHROMIUM:
        pytest.skip("no chromium binary")
    async with playwright_api.async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        await b.close()


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
                                         browser: Any) -> None:
    """Every slot gets accuracy points and timeline segments live; a second page opened
    mid-run shows the same; after the end the page shows 'finished' with the whole run."""
    shots = _screenshot_dir(tmp_path)
    run = start_coordinator(redis_server.url, tmp_path / "runs", "dash", "--task",
                            "tests.e2e_tasks:SlowClientTask", "--task-option", "base_s=0.4",
                            "--slots", str(SLOTS), "--clients", "6", "--rounds", str(ROUNDS),
                            "--local-agents", "2")
    with run:
        url = _url(run)
        page = await browser.new_page(viewport={"width": 1400, "height": 1000})
        await page.goto(url)
        await page.wait_for_function(EVERY_SLOT_PLOTTED, arg=[SLOTS, 2], timeout=150_000)
        await page.screenshot(path=shots / "dashboard-mid-run.png", full_page=True)
        print(f"mid-run screenshot: {shots / 'dashboard-mid-run.png'}")  # noqa: T201
        late_page = await browser.new_page(viewport={"width": 1400, "height": 1000})
        await late_page.goto(url)  # opened mid-run: starts from the snapshot
        await late_page.wait_for_function(EVERY_SLOT_PLOTTED, arg=[SLOTS, 2], timeout=30_000)
        assert run.wait(200) == 0, run.output()[-3000:]
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
