"""Running a coordinator to the end on uvloop: events, signals, the closing table."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import sys
from typing import Any

import structlog
from rich.console import Console
from rich.markup import escape

from bus.connection import refused
from bus.errors import EXIT_REFUSED, BusError, RedisUnavailable
from coordinator.app import Coordinator, RunOutcome
from coordinator.http import HttpServerError
from coordinator.local_agents import LocalAgentFailed
from coordinator.progress import Progress
from coordinator.settings import CoordinatorSecrets, CoordinatorSettings
from coordinator.strategies import StrategyError
from serialization.errors import TaskError

log = structlog.get_logger()


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.new_event_loop
    return uvloop.new_event_loop


async def _run(coordinator: Coordinator) -> RunOutcome:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None

    def on_term() -> None:  # SIGTERM: like Ctrl-C, a graceful stop; a second one forces exit
        loop.remove_signal_handler(signal.SIGTERM)
        loop.add_signal_handler(signal.SIGTERM, lambda: sys.exit(143))
        main_task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    return await coordinator.run()


def agents_hint(settings: CoordinatorSettings) -> str:
    """What to start where, for a run whose agents are not started by the coordinator."""
    url = settings.redis_url or ""
    ids = ",".join(str(i) for i in range(settings.expected_clients))
    lines = [f"Waiting up to {settings.wait_clients_s:g} s (--wait-clients) for clients {ids}. "
             f"On each silo host start an agent for its clients, e.g.:",
             f"  python -m client_agent --redis {url} --clients {ids}"]
    if url.startswith("unix://"):
        lines.append("This Redis is private to this host (a unix socket): agents elsewhere "
                     "need --redis redis://HOST:PORT on a Redis they can reach "
                     "(docs/deploy.md), or use --local-agents N here.")
    return "\n".join(lines)


USER_ERRORS = (HttpServerError, TaskError, LocalAgentFailed, BusError, StrategyError)


def _user_error(exc: BaseException) -> str | None:
    """The message of an error the user can fix (maybe inside a task group), else None."""
    if isinstance(exc, USER_ERRORS):
        return str(exc)
    if isinstance(exc, BaseExceptionGroup):
        messages = [_user_error(e) for e in exc.exceptions]
        if messages and all(messages):
            return "; ".join(dict.fromkeys(m for m in messages if m))  # each once
    return None


def _redis_gone(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_redis_gone(e) for e in exc.exceptions)
    return isinstance(exc, RedisUnavailable)


def _exit_for(exc: Exception, settings: CoordinatorSettings, console: Console) -> int:
    """What the user is told of an error, and the exit code; an unexpected error re-raised."""
    refusal = refused(exc)
    if refusal is not None:  # login, ACL or TLS: retrying or resuming will not help
        log.error("redis_refused", reason=refusal.reason, error=str(refusal))
        console.print(f"[red]error:[/] {escape(str(refusal))}", soft_wrap=True)
        return EXIT_REFUSED
    message = _user_error(exc)
    if message is None:
        raise exc
    console.print(f"[red]error:[/] {message}")
    if _redis_gone(exc):
        console.print(f"Redis stayed unreachable for over {settings.redis_outage_s:g} s "
                      f"(--redis-outage-s); once it is back, continue with: "
                      f"python -m coordinator --resume {settings.run_id}")
    return 2


def run_coordinator(settings: CoordinatorSettings, *, resume_state: dict[str, Any] | None = None,
                    summary_json: bool = False, secrets: CoordinatorSecrets | None = None) -> int:
    """Run to the end (events already configured); exit 0 when every slot finished, 1 if not
    (POST /stop included), 130 on Ctrl-C, 143 on SIGTERM, 2 for an error the user can fix,
    EXIT_REFUSED (78) when Redis refuses the coordinator (login, ACL or TLS)."""
    coordinator = Coordinator(settings, resume_state=resume_state,
                              show_progress=None if settings.progress else False,
                              secrets=secrets)
    console = Console(stderr=True)
    console.print(f"PWFL run [bold]{settings.run_id}[/]: {settings.slots} slot(s) x "
                  f"{settings.rounds} rounds, {settings.expected_clients} clients; "
                  f"events -> {settings.events_path}")
    if not settings.local_agents and resume_state is None:
        console.print(agents_hint(settings), soft_wrap=True)  # commands stay whole
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            summary = runner.run(_run(coordinator))
    except KeyboardInterrupt:
        console.print(f"interrupted; resume with: python -m coordinator --resume {settings.run_id}")
        return 130
    except asyncio.CancelledError:  # SIGTERM or POST /stop: the same graceful stop as Ctrl-C
        how = "stopped (POST /stop)" if coordinator.stop_requested else "terminated"
        console.print(f"{how}; resume with: python -m coordinator --resume {settings.run_id}")
        return 1 if coordinator.stop_requested else 143
    except Exception as exc:  # noqa: BLE001 - _exit_for re-raises what the user cannot fix
        return _exit_for(exc, settings, console)
    Progress(coordinator.status, live=False).final()
    console.print(f"wall time {summary.wall_s:.1f}s; events: {summary.events_path}")
    if summary_json:
        print(json.dumps(dataclasses.asdict(summary)))  # noqa: T201 - the requested output
    return 0 if summary.status == "finished" else 1
