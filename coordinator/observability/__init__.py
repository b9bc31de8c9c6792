"""The operator's window on a running coordinator: Prometheus metrics, the live dashboard,
model download.

All of it is fed by the run's own events (`serialization.events.observe`) and
`RunStatus`, so the coordinator's core only creates an `Observability` and
attaches it for the run; `coordinator.http` serves the routes.

    metrics.py    the Prometheus metrics (private registry per coordinator)
    dashboard.py  the page's state and its Server-Sent Events stream
    downloads.py  safetensors / PWFL model download, the list of kept checkpoints
    static/       index.html, dashboard.js/css and the vendored uPlot (MIT, see LICENSE)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

from coordinator.checkpoints import CheckpointStore
from coordinator.observability.dashboard import DashboardHub, DashboardState
from coordinator.observability.downloads import LatestModel, ModelSource
from coordinator.observability.metrics import CoordinatorMetrics
from coordinator.status import RunStatus
from serialization.events import observe

__all__ = ["LatestModel", "ModelSource", "Observability", "static_file"]

STATIC_FILES = {  # the only files GET /static/{name} serves, with their content type
    "index.html": "text/html", "dashboard.js": "text/javascript",
    "dashboard.css": "text/css", "uPlot.iife.min.js": "text/javascript",
    "uPlot.min.css": "text/css", "LICENSE.uPlot": "text/plain",
}


def static_file(name: str) -> bytes | None:
    """A dashboard file shipped in the package, or None if it is not one of them."""
    if name not in STATIC_FILES:
        return None
    return (resources.files(__package__) / "static" / name).read_bytes()


class Observability:
    """Metrics, dashboard and model access of one run, fed by its events once attached."""

    def __init__(self, status: RunStatus, status_json: Callable[[], dict[str, Any]], *,
                 models: ModelSource | None = None,
                 checkpoints: Callable[[], CheckpointStore | None] = lambda: None) -> None:
        self.run_id = status.run_id
        self.metrics = CoordinatorMetrics(status)
        self.dashboard = DashboardHub(DashboardState(status.run_id, status.started_at),
                                      status_json)
        self.models: ModelSource = models or (lambda _slot_id: None)
        self.checkpoints = checkpoints
        self._detach: Callable[[], None] | None = None

    def _observe(self, event: Mapping[str, Any]) -> None:
        if event.get("run_id", self.run_id) != self.run_id:
            return  # another coordinator in this process (tests)
        self.metrics.observe(event)
        self.dashboard.observe(event)

    def attach(self) -> None:
        """Start following this process's events (idempotent)."""
        if self._detach is None:
            self._detach = observe(self._observe)

    def detach(self) -> None:
        if self._detach is not None:
            self._detach()
            self._detach = None
