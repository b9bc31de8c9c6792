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
