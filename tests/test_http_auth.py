"""The coordinator's HTTP API: read-only routes are open, POST /stop needs the bearer token."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from structlog.testing import capture_logs

from coordinator.http import StatusServer

TOKEN = "t0ken-" + "x" * 30


@pytest.fixture
async def api() -> AsyncIterator[tuple[str, list[str]]]:
    """A StatusServer with a token on a free port; yields its URL and the stop requests it got."""
    stops: list[str] = []
    server = StatusServer(lambda: {"rejected": {}}, "127.0.0.1", 0, token=TOKEN,
                          on_stop=stops.append)
    url = await server.start()
    yield url, stops
    await server.stop()


async def _post(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.post(url, headers=headers) as r:
        return r.status, dict(r.headers)


async def test_read_only_routes_need_no_token(api: tuple[str, list[str]]) -> None:
    """GET /healthz and /status answer without any credentials."""
    url, _ = api
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/status"):
            async with session.get(url + path) as response:
                assert response.status == 200


@pytest.mark.parametrize("headers", [
    None, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}x"},
], ids=["none", "wrong", "basic", "bare", "longer"])
async def test_stop_without_the_token_is_401(api: tuple[str, list[str]],
                                             headers: dict[str, str] | None) -> None:
    """POST /stop with no, another or a malformed token: 401, nothing stops, token not logged."""
    url, stops = api
    with capture_logs() as logs:
        status, answer_headers = await _post(url + "/stop", headers)
    assert status == 401
    assert answer_headers["WWW-Authenticate"] == "Bearer"
    assert stops == []
    assert [e["event"] for e in logs] == ["http_unauthorized"]
    assert TOKEN not in repr(logs)


async def test_stop_with_the_token_asks_for_a_graceful_stop(api: tuple[str, list[str]]) -> None:
    """POST /stop with the bearer token answers 202 and requests the stop once."""
    url, stops = api
    status, _ = await _post(url + "/stop", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 202
    assert stops == ["http"]


async def test_without_a_configured_token_state_changes_are_refused() -> None:
    """A server with no token refuses every state-changing request."""
    stops: list[str] = []
    server = StatusServer(dict, "127.0.0.1", 0, on_stop=stops.append)
    url = await server.start()
    try:
        status, _ = await _post(url + "/stop", {"Authorization": "Bearer "})
        assert status == 401
        assert stops == []
    finally:
        await server.stop()
