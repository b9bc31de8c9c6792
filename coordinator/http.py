"""The coordinator's HTTP API (aiohttp).

    GET  /healthz   liveness                                    open
    GET  /status    the run's live state (slots, clients, rejected counts)   open
    POST /stop      graceful stop: the run ends "interrupted", resumable      token
    GET  /          the live dashboard (static files under /static/)        open
    GET  /events    the dashboard's Server-Sent Events stream                open
    GET  /metrics   Prometheus text format                                   open
    GET  /slots/{slot_id}/model     latest aggregate, safetensors or ?format=pwfl   token
    GET  /runs/{run_id}/checkpoints the model checkpoints kept on disk              token

A route that changes state or hands out a model needs ``Authorization: Bearer
TOKEN`` (compared in constant time); without it, or with a wrong one, the answer
is 401 and the attempt is logged and counted (never the token). With no token
configured such routes always answer 401. The dashboard, events and metrics
routes exist when the server is given an `Observability` (the coordinator's).
"""

from __future__ import annotations

import errno
import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

if TYPE_CHECKING:
    from coordinator.observability import Observability

log = structlog.get_logger()


class HttpServerError(Exception):
    """The HTTP API could not listen where it was asked to."""


class StatusServer:
    def __init__(self, status: Callable[[], dict[str, Any]], host: str, port: int, *,
                 token: str | None = None,
                 on_stop: Callable[[str], None] | None = None,
                 observability: Observability | None = None) -> None:
        self._status = status
        self._observability = observability
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
        if self._observability is not None:
            self._add_observability_routes(app, self._observability)
        return app

    def _add_observability_routes(self, app: web.Application, obs: Observability) -> None:
        from coordinator.observability import STATIC_FILES, downloads, static_file
        from coordinator.observability.metrics import CONTENT_TYPE

        async def page(request: web.Request) -> web.Response:
            name = request.match_info.get("name", "index.html")
            body = static_file(name)
            if body is None:
                raise web.HTTPNotFound()
            return web.Response(body=body, content_type=STATIC_FILES[name],
                                charset="utf-8" if name != "LICENSE.uPlot" else None)

        async def metrics(_request: web.Request) -> web.Response:
            return web.Response(body=obs.metrics.render(),
                                headers={"Content-Type": CONTENT_TYPE})

        async def model(request: web.Request) -> web.Response:
            return await downloads.model_response(request, obs.models, obs.checkpoints(),
                                               obs.run_id)

        async def checkpoints(request: web.Request) -> web.Response:
            return await downloads.checkpoints_response(request, obs.checkpoints(), obs.run_id)

        async def result(request: web.Request) -> web.Response:
            return await downloads.result_response(request, obs.checkpoints(), obs.run_id)

        app.router.add_get("/", page)
        app.router.add_get("/static/{name}", page)
        app.router.add_get("/events", obs.dashboard.stream)
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/slots/{slot_id}/model", self._guarded(model))
        app.router.add_get("/runs/{run_id}/checkpoints", self._guarded(checkpoints))
        app.router.add_get("/runs/{run_id}/result", self._guarded(result))
        app.on_startup.append(obs.dashboard.start)
        app.on_shutdown.append(obs.dashboard.close)

    def _guarded(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                 ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self._authorized(request):
                return self._unauthorized(request)
            return await handler(request)

        return guarded

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if self._token is None or scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), self._token.encode())

    def _unauthorized(self, request: web.Request) -> web.Response:
        resource = request.match_info.route.resource
        log.warning("http_unauthorized", method=request.method, path=request.path[:200],
                    route=resource.canonical if resource is not None else None,
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
