"""The event log: every state change as one structlog event.

Each process calls `configure_events` once at its entry point (spawned trainer
processes too). Events go as JSON lines to a file (the replay tool's only input)
and, filtered by level, as readable lines to stderr. Every JSON line carries
``ts`` (unix seconds, float), ``event``, ``level``, ``proc`` (coordinator,
agent, trainer) and ``pid``, plus whatever was bound with
`structlog.contextvars.bind_contextvars` (``run_id`` at least).

`observe` hands every event, as it is logged, to an in-process callback too
(the coordinator's metrics and live dashboard, an agent's metrics): the log
stays the one source of what happened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import IO, Any, TextIO

import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class _JsonTee:
    """Writes every event as a JSON line to a file, then passes it on unchanged."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
        line = json.dumps(event, default=_jsonable, separators=(",", ":"))
        with self._lock:
            self._stream.write(line + "\n")
        return event


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)


Observer = Callable[[Mapping[str, Any]], None]
_observers: list[Observer] = []


def _notify_observers(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
    """Hand the event to each observer; an observer's error never breaks logging."""
    for observer in tuple(_observers):
        with contextlib.suppress(Exception):  # a metric must not take the logger down
            observer(event)
    return event


def observe(observer: Observer) -> Callable[[], None]:
    """Call `observer(event)` for every event this process logs (after the time stamp and
    bound context are added; the callback must not change it and must be quick). Works
    whether or not `configure_events` ran. Returns the function that stops it."""
    _observers.append(observer)
    processors = list(structlog.get_config()["processors"])
    if _notify_observers not in processors:
        stamps = [i for i, p in enumerate(processors)
                  if isinstance(p, structlog.processors.TimeStamper)
                  or p is structlog.contextvars.merge_contextvars]
        processors.insert(stamps[-1] + 1 if stamps else 0, _notify_observers)
        structlog.configure(processors=processors)
    return lambda: _observers.remove(observer) if observer in _observers else None


def _console_filter(min_level: int) -> Any:
    def drop_below(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
        if _LEVELS.get(event.get("level", "info"), 20) < min_level:
            raise structlog.DropEvent
        return event

    return drop_below


def configure_events(
    proc: str,
    *,
    log_file: str | Path | None = None,
    console_level: str = "info",
    console: TextIO | None = None,
) -> None:
    """Set structlog up for this process: JSON lines to `log_file`, text to stderr."""
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt=None, key="ts"),
        _static(proc=proc, pid=os.getpid()),
        structlog.processors.format_exc_info,
        _notify_observers,
    ]
    if log_file is not None:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        processors.append(_JsonTee(path.open("a", buffering=1, encoding="utf-8")))
    processors += [
        _console_filter(_LEVELS[console_level]),
        structlog.dev.ConsoleRenderer(colors=(console or sys.stderr).isatty()),
    ]
    structlog.configure(
        processors=processors,
        logger_factory=structlog.PrintLoggerFactory(console or sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )


def _static(**fields: Any) -> Any:
    def add(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
        for key, value in fields.items():
            event.setdefault(key, value)
        return event

    return add
