"""docs/events.md names every event the code logs: the replay tool's users read it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bus", "coordinator", "client_agent", "trainer_worker", "serialization", "replay")
LOGGED = re.compile(r"""\blog\.(?:debug|info|warning|error|exception)\(\s*["']([a-z_]+)["']""")


def logged_events() -> set[str]:
    return {name for package in PACKAGES for path in (ROOT / package).rglob("*.py")
            for name in LOGGED.findall(path.read_text())}


def test_every_logged_event_is_documented() -> None:
    doc = (ROOT / "docs" / "events.md").read_text()
    events = logged_events()
    assert len(events) > 50  # the pattern still finds the calls
    assert sorted(e for e in events if f"`{e}`" not in doc) == []
