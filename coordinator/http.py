"""The coordinator's HTTP API (aiohttp).

    GET  /healthz   liveness                                    open
    GET  /status    the run's live state (slots, clients, rejected counts)   open
    POST /stop      graceful stop: the run ends "interrupted", resumable      token

A route that changes state needs ``Authorization: Bearer TOKEN`` (compared in
constant time); without it, or with a wrong one, the answer is 401 and the
attempt is logged (never the token). With no token configured such routes
always answer 401.
"""

from __future__ import annotations

import errno
import hmac
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger()


class HttpServerError(Exception):
    """The HTTP API could not listen where it was asked to."""


class StatusServer:
    def __init__(self, status: Callable[[], dict[str, Any]], host: str, port: int, *,
                 token: str | None = None,
                 on_stop: Callable[[str], None] | None = None) -> None:
        self._status = status
        self._host, self._port = host, port
        self._token = token
        self._on_stop = on_stop
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/status", self._status_route)
        app.router.add_post("/stop", self._stop_route)
        return app

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if self._token is None or scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), self._token.encode())

    def _unauthorized(self, request: web.Request) -> web.Response:
        log.warning("http_unauthorized", method=request.method, path=request.path,
                    remote=request.remote)
        return web.json_response({"error": "unauthorized"}, status=401,
                                 headers={"WWW-Authenticate": "Bearer"})

    async def _stop_route(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized(request)
        if self._on_stop is not None:
            self._on_stop("http")
        response = web.json_response({"stopping": True}, status=202)
        response.force_close()  # the server closes right after; no keep-alive to wait for
        return response

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
