"""An agent's Prometheus metrics (`--metrics-port`, off by default), from its own events.

Silo hosts are often outbound-only, so nothing listens unless asked; then a
small HTTP server (prometheus-client's, in a daemon thread: the event loop
never serves it) answers GET /metrics on `--metrics-host` (default loopback,
for a Prometheus or an exporter on the same host). Counters follow the agent's
events (docs/events.md); shared memory is read from /dev/shm when scraped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serialization.events import observe
from trainer_worker import shm

log = structlog.get_logger()


class AgentMetrics:
    """Metric objects on a private registry; `observe(event)` is the structlog observer."""

    def __init__(self, owner_pid: int | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter("pwfl_agent_jobs", "Jobs trained, by client and status (ok, failed)",
                            ("client", "status"), registry=r)
        self.train_s = Counter("pwfl_agent_train_seconds", "Seconds spent in training calls",
                               ("client",), registry=r)
        self.rejected = Counter("pwfl_agent_jobs_rejected", "Job entries refused, by reason",
                                ("reason",), registry=r)
        self.trainer_starts = Counter("pwfl_agent_trainer_starts", "Trainer processes started",
                                      ("device",), registry=r)
        self.trainer_restarts = Counter("pwfl_agent_trainer_restarts", "Trainers that died or "
                                        "were stopped during a job (each is replaced)",
                                        ("device",), registry=r)
        self.fetches = Counter("pwfl_agent_model_fetches", "Models a job needed, by whether the "
                               "cache already held them (hit) or they were downloaded (miss)",
                               ("cache",), registry=r)
        self.transfer = Counter("pwfl_agent_transfer_bytes", "Bytes moved: down = models "
                                "downloaded, up = updates uploaded", ("direction",), registry=r)
        self.reconnections = Counter("pwfl_agent_redis_reconnections",
                                     "Redis outages survived", registry=r)
        r.register(_SharedMemoryCollector(owner_pid or os.getpid()))

    def observe(self, event: Mapping[str, Any]) -> None:
        handler = self._handlers.get(str(event.get("event")))
        if handler is not None:
            handler(self, event)

    def _job_finished(self, event: Mapping[str, Any]) -> None:
        client = str(event.get("client_id"))
        self.jobs.labels(client, "ok" if event.get("status") == "ok" else "failed").inc()
        train_s = event.get("train_s")
        if isinstance(train_s, int | float) and train_s >= 0:
            self.train_s.labels(client).inc(train_s)

    def _job_rejected(self, event: Mapping[str, Any]) -> None:
        self.rejected.labels(str(event.get("reason"))).inc()

    def _trainer_started(self, event: Mapping[str, Any]) -> None:
        self.trainer_starts.labels(str(event.get("device"))).inc()

    def _trainer_exited(self, event: Mapping[str, Any]) -> None:
        if event.get("job_id"):  # stopped mid-job: buried and replaced
            self.trainer_restarts.labels(str(event.get("device"))).inc()

    def _model_fetched(self, event: Mapping[str, Any]) -> None:
        cached = bool(event.get("cached"))
        self.fetches.labels("hit" if cached else "miss").inc()
        if not cached:
            self.transfer.labels("down").inc(int(event.get("nbytes") or 0))

    def _update_uploaded(self, event: Mapping[str, Any]) -> None:
        self.transfer.labels("up").inc(int(event.get("nbytes") or 0))

    def _redis_reconnected(self, _event: Mapping[str, Any]) -> None:
        self.reconnections.inc()

    _handlers: dict[str, Callable[[AgentMetrics, Mapping[str, Any]], None]] = {
        "job_finished": _job_finished, "job_rejected": _job_rejected,
        "trainer_started": _trainer_started, "trainer_exited": _trainer_exited,
        "model_fetched": _model_fetched, "update_uploaded": _update_uploaded,
        "redis_reconnected": _redis_reconnected,
    }


class _SharedMemoryCollector(Collector):
    """Bytes in the shared-memory segments this agent owns (models it caches, updates its
    trainers hand over), by kind; read from /dev/shm at scrape time."""

    def __init__(self, owner_pid: int) -> None:
        self._prefix = shm.owned_prefix("", owner_pid)

    def collect(self) -> Iterator[Metric]:
        totals = {"model": 0, "update": 0}
        try:
            names = os.listdir(shm.SHM_DIR)
        except OSError:
            names = []
        for name in names:
            if name.startswith(self._prefix):
                kind = "model" if name[len(self._prefix):].startswith("m") else "update"
                try:
                    totals[kind] += os.stat(os.path.join(shm.SHM_DIR, name)).st_size
                except OSError:
                    continue  # unlinked meanwhile
        family = GaugeMetricFamily("pwfl_agent_shared_memory_bytes", "Bytes in shared-memory "
                                   "segments this agent owns", labels=["kind"])
        for kind, nbytes in totals.items():
            family.add_metric([kind], nbytes)
        yield family


def serve_metrics(host: str, port: int) -> Callable[[], None]:
    """Follow this process's events and serve GET /metrics on host:port (0: a free port);
    the function that stops both. SystemExit when the port cannot be had."""
    metrics = AgentMetrics()
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise SystemExit(f"error: cannot serve metrics on {host}:{port}: {exc.strerror}; "
                         "choose another --metrics-port") from None
    stop_observing = observe(metrics.observe)
    log.info("metrics_listening", url=f"http://{host}:{server.server_port}/metrics")

    def stop() -> None:
        stop_observing()
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop
