"""The coordinator's HTTP API (aiohttp): `/healthz` and `/status`.

Read-only routes need nothing; any route that changes state will require the
API token (`Authorization: Bearer ...`).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger()


class HttpServerError(Exception):
    """The HTTP API could not listen where it was asked to."""


class StatusServer:
    def __init__(self, status: Callable[[], dict[str, Any]], host: str, port: int) -> None:
        self._status = status
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/status", self._status_route)
        return app

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _status_route(self, _request: web.Request) -> web.Response:
        return web.json_response(self._status())

    async def start(self, *, fallback_to_any_port: bool = False) -> str:
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        try:
            port = await self._listen(self._port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or not fallback_to_any_port:
                await self.stop()
                raise HttpServerError(
                    f"cannot listen on {self._host}:{self._port}: {exc.strerror}; "
                    "choose another --http-port (0 picks a free one)") from exc
            port = await self._listen(0)
            log.warning("http_port_in_use", wanted=self._port, port=port)
        self.url = f"http://{self._host}:{port}"
        log.info("http_listening", url=self.url)
        return self.url

    async def _listen(self, port: int) -> int:
        assert self._runner is not None
        site = web.TCPSite(self._runner, self._host, port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
