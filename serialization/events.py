"""The event log: every state change as one structlog event.

Each process calls `configure_events` once at its entry point (spawned trainer
processes too). Events go as JSON lines to a file (the replay tool's only input)
and, filtered by level, as readable lines to stderr. Every JSON line carries
``ts`` (unix seconds, float), ``event``, ``level``, ``proc`` (coordinator,
agent, trainer) and ``pid``, plus whatever was bound with
`structlog.contextvars.bind_contextvars` (``run_id`` at least).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import MutableMapping
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
