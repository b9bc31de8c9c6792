"""docs/events.md names every event the code logs: the replay tool's users read it."""

from __future__ import annotations

import re
from pathlib import Path

from replay.events import KNOWN_EVENTS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bus", "coordinator", "client_agent", "trainer_worker", "serialization", "replay")
LOGGED = re.compile(
    r"""\b(?:log\.(?:debug|info|warning|error|exception)|emit)\(\s*["']([a-z_]+)["']""")
# Named in a variable where they are logged.
INDIRECT = {"run_started", "run_resumed"}


def logged_events() -> set[str]:
    return INDIRECT | {name for package in PACKAGES for path in (ROOT / package).rglob("*.py")
                       for name in LOGGED.findall(path.read_text())}


def test_every_logged_event_is_documented() -> None:
    doc = (ROOT / "docs" / "events.md").read_text()
    events = logged_events()
    assert len(events) > 50  # the pattern still finds the calls
    assert sorted(e for e in events if f"`{e}`" not in doc) == []


def test_replay_knows_every_logged_event() -> None:
    """The replay warns about an event it does not know: none that PWFL logs may be one."""
    assert sorted(logged_events() - KNOWN_EVENTS) == []


def _typed_events() -> set[str]:
    """The names of every typed slot event (logged with `emit(log, Event(...))`, which the
    pattern above cannot see)."""
    from serialization.slot_events import SlotEvent

    found, todo = set(), list(SlotEvent.__subclasses__())
    while todo:
        cls = todo.pop()
        found.add(cls.name)
        todo += cls.__subclasses__()
    return found


def test_every_typed_slot_event_is_documented_and_known() -> None:
    """validation_finished and the other typed constructors are in docs/events.md and known to
    the replay, whether or not a module logs them yet."""
    doc = (ROOT / "docs" / "events.md").read_text()
    typed = _typed_events()
    assert "validation_finished" in typed
    assert sorted(e for e in typed if f"| `{e}` |" not in doc) == []
    assert sorted(typed - KNOWN_EVENTS) == []
