"""The operator's window on a real run (coordinator, an agent with --metrics-port, trainers):
Debian's Prometheus scrapes both and answers a query; a model downloaded with the token
evaluates to the accuracy /status reports; the guarded routes refuse a wrong token."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from bus.embedded import EmbeddedRedis
from serialization import decode
from tests.e2e import ROOT, Run, read_events, start_coordinator, wait_for_events
from tests.e2e_tasks import SlowClientTask

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
CLIENTS = 4


@dataclass
class ObservedRun:
    run: Run
    url: str
    token: str
    agent_metrics_url: str


def _get(url: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url)  # noqa: S310 - http to our own test server
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _status(url: str) -> dict[str, Any]:
    return dict(json.loads(_get(url + "/status")[2]))


def _until(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not reached in {timeout_s} s")


def _start_agent(redis_url: str, run_id: str, log_file: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "client_agent", "--redis", redis_url, "--run-id", run_id,
            "--clients", ",".join(str(i) for i in range(CLIENTS)), "--devices", "cpu,cpu",
            "--exit-when-done", "--metrics-port", "0", "--log-file", str(log_file),
            "--allow-task", "tests.e2e_tasks:SlowClientTask"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def observed(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[ObservedRun]:
    """Two slots of the synthetic task (0.2 s a job) for many rounds, one external agent;
    stopped with POST /stop at the end of the module."""
    runs_dir = tmp_path_factory.mktemp("runs")
    run = start_coordinator(redis_server.url, runs_dir, "observed", "--task",
                            "tests.e2e_tasks:SlowClientTask", "--task-option", "base_s=0.2",
                            "--slots", "2", "--clients", str(CLIENTS), "--rounds", "1000",
                            "--keep-checkpoints", "2000")
    agent_log = runs_dir / "agent.jsonl"
    agent = _start_agent(redis_server.url, "observed", agent_log)
    try:
        with run:
            events = run.wait_for(lambda es: any(e["event"] == "http_listening" for e in es))
            url = next(e for e in events if e["event"] == "http_listening")["url"]
            listening = wait_for_events(lambda: read_events(agent_log), agent,
                                        lambda es: any(e["event"] == "metrics_listening"
                                                       for e in es), 120, "agent", str)
            agent_url = next(e for e in listening if e["event"] == "metrics_listening")["url"]
            token = (runs_dir / "observed" / "api_token").read_text().strip()
            yield ObservedRun(run, url, token, agent_url)
            request = urllib.request.Request(url + "/stop", method="POST",  # noqa: S310
                                             headers={"Authorization": f"Bearer {token}"})
            urllib.request.urlopen(request, timeout=30).close()  # noqa: S310
            assert run.wait(120) == 1  # stopped: interrupted, resumable
    finally:
        try:
            agent.wait(60)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def prometheus(observed: ObservedRun, tmp_path: Path) -> Iterator[str]:
    """Debian's prometheus scraping the coordinator and the agent every second; its URL."""
    if not os.path.exists(PROMETHEUS):
        pytest.skip("no prometheus binary (apt-get install prometheus)")
    targets = {"pwfl-coordinator": urllib.parse.urlsplit(observed.url).netloc,
               "pwfl-agent": urllib.parse.urlsplit(observed.agent_metrics_url).netloc}
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n"
                      + "".join(f"  - job_name: {job}\n    static_configs:\n"
                                f"      - targets: ['{target}']\n"
                                for job, target in targets.items()))
    port = _free_port()
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def _query(prometheus: str, promql: str) -> float | None:
    try:
        _, _, body = _get(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    except OSError:
        return None  # not listening yet
    result = json.loads(body).get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_and_answers_a_query(observed: ObservedRun, prometheus: str) -> None:
    """A real Prometheus scrapes /metrics of the coordinator and of the agent; its query API
    returns rounds completed (aggregated) and the agent's jobs, at most what the run has
    done."""
    rounds = _until(lambda: _query(prometheus, "sum(pwfl_slot_rounds_completed_total)"), 90,
                    "prometheus has scraped aggregated rounds")
    jobs = _until(lambda: _query(prometheus, 'sum(pwfl_agent_jobs_total{status="ok"})'), 60,
                  "prometheus has scraped the agent's jobs")
    hits = _until(lambda: _query(prometheus, "sum(pwfl_agent_model_fetches_total)"), 30,
                  "model fetches")
    aggregated_now = len(observed.run.events("aggregation_finished"))
    print(f"prometheus: pwfl_slot_rounds_completed_total={rounds:g} (log: {aggregated_now}), "  # noqa: T201
          f"pwfl_agent_jobs_total={jobs:g}, model fetches={hits:g}")
    assert 1 <= rounds <= aggregated_now
    assert jobs >= 1
    up = _query(prometheus, 'sum(up{job=~"pwfl-.*"})')
    assert up == 2.0


def test_downloaded_model_scores_what_status_reports(observed: ObservedRun,
                                                     tmp_path: Path) -> None:
    """GET /slots/0/model with the token: safetensors that load into the task's model and
    evaluate to the accuracy /status reports for that round; PWFL format holds the same."""
    _until(lambda: _status(observed.url)["slots"][0]["rounds_done"] >= 1, 120, "a closed round")
    status, headers, body = _get(observed.url + "/slots/0/model", observed.token)
    assert status == 200
    round_ = int(headers["X-PWFL-Round"])
    assert headers["X-PWFL-Digest"] == hashlib.sha256(body).hexdigest()
    path = tmp_path / "slot0.safetensors"
    path.write_bytes(body)
    from safetensors.torch import load_file

    task = SlowClientTask(num_clients=CLIENTS)
    model = task.build_model(0)
    model.load_state_dict(load_file(path))
    accuracy = task.evaluate(model, torch.device("cpu"))["accuracy"]
    reported = _until(lambda: next((p["accuracy"] for p in _status(observed.url)["slots"][0]
                                    ["accuracies"] if p["round"] == round_), None), 60,
                      f"/status has round {round_}'s accuracy")
    print(f"slot 0 round {round_}: downloaded model {accuracy:.6f}, /status {reported:.6f}")  # noqa: T201
    assert accuracy == reported
    status, headers, wire = _get(observed.url + f"/slots/0/model?format=pwfl&round={round_}",
                                 observed.token)
    assert status == 200
    assert headers["X-PWFL-Round"] == str(round_)
    for name, tensor in decode(wire)[0].items():
        assert torch.equal(tensor, model.state_dict()[name])


def test_checkpoints_are_listed_with_the_token(observed: ObservedRun) -> None:
    """GET /runs/RUN/checkpoints lists the kept rounds of each slot; another run is 404."""
    def listed() -> list[dict[str, Any]] | None:
        """The listing once both slots' round 1 is checkpointed (a round counts as done when
        aggregated; its checkpoint comes behind it)."""
        status, _, body = _get(observed.url + "/runs/observed/checkpoints", observed.token)
        assert status == 200
        kept: list[dict[str, Any]] = json.loads(body)["checkpoints"]
        return kept if {(c["slot_id"], c["round"]) for c in kept} >= {(0, 1), (1, 1)} else None

    kept = _until(listed, 120, "round 1 of both slots checkpointed")
    assert all(c["nbytes"] > 0 for c in kept)
    assert _get(observed.url + "/runs/another/checkpoints", observed.token)[0] == 404


def test_a_run_without_a_final_model_answers_404_for_its_result(observed: ObservedRun) -> None:
    """GET /runs/RUN/result is --merge final's model: this run has none (404), with the
    token; another run is 404 too."""
    status, _, body = _get(observed.url + "/runs/observed/result", observed.token)
    assert (status, b"--merge final" in body) == (404, True)
    assert _get(observed.url + "/runs/another/result", observed.token)[0] == 404


@pytest.mark.parametrize("path", ["/slots/0/model", "/runs/observed/checkpoints",
                                  "/runs/observed/result"])
def test_wrong_token_is_refused_logged_and_counted(observed: ObservedRun, path: str) -> None:
    """Without the token, or with a wrong one: 401, an http_unauthorized event, the counter
    in /metrics goes up, and the token given appears in no answer and no log line."""
    route = {"/slots/0/model": "/slots/{slot_id}/model",
             "/runs/observed/checkpoints": "/runs/{run_id}/checkpoints",
             "/runs/observed/result": "/runs/{run_id}/result"}[path]
    wrong = "not-the-token-" + "y" * 20
    for token in (None, wrong):
        status, headers, body = _get(observed.url + path, token)
        assert status == 401
        assert headers["WWW-Authenticate"] == "Bearer"
        assert wrong.encode() not in body
    metrics = _get(observed.url + "/metrics")[2].decode()
    line = next(x for x in metrics.splitlines()
                if x.startswith(f'pwfl_http_unauthorized_total{{route="{route}"}}'))
    assert float(line.split()[-1]) >= 2
    refused = [e for e in observed.run.events("http_unauthorized") if e["route"] == route]
    assert len(refused) >= 2
    assert wrong not in observed.run.events_path.read_text()
