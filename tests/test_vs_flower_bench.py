"""bench.vs_flower's pure parts: partitions, parsing and the per-round arithmetic."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

import pytest

from bench import vs_flower
from bench.flower_app import deployment, runs
from trainer_worker import data


def test_seeds_parse_and_reject_repeats() -> None:
    """'0,1,2' is three seeds; empty or repeated lists are refused."""
    assert vs_flower.parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("", "1,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            vs_flower.parse_seeds(bad)


def test_candidate_parses_to_a_labelled_setting() -> None:
    """EPOCHS,BATCH,LR,MAX_STEPS becomes a Setting; three fields are refused."""
    got = vs_flower.parse_candidate("1,32,0.05,80")
    assert (got.epochs, got.batch_size, got.lr, got.max_steps) == (1, 32, 0.05, 80)
    assert got.label.startswith("pwfl-candidate")
    with pytest.raises(argparse.ArgumentTypeError):
        vs_flower.parse_candidate("1,32,0.05")


@pytest.mark.skipif(data.find_data_dir(environ={}) is None,
                    reason="needs the Fashion-MNIST IDX files")
def test_flower_clients_get_pwfl_partitions() -> None:
    """Flower's client p trains on exactly what PWFL's client p trains on: its Dirichlet
    partition less the validation split PWFL holds out (10%), for each seed."""
    from trainer_worker.tasks.fashion_mnist import FashionMnistTask

    for seed in (0, 1):
        parts = vs_flower.partition_indices(seed)
        labels = data.load_split("train").labels.numpy()
        expected = data.dirichlet_partition(labels, vs_flower.CLIENTS, vs_flower.ALPHA, seed)
        task = FashionMnistTask(num_clients=vs_flower.CLIENTS, alpha=vs_flower.ALPHA,
                                partition_seed=seed)
        for p, (part, whole) in enumerate(zip(parts, expected, strict=True)):
            held_out = task.validation_indices(p).tolist()
            assert sorted(part + held_out) == sorted(whole.tolist())
            assert not set(part) & set(held_out)
            assert len(held_out) == round(len(whole) * 0.1)
    assert vs_flower.partition_indices(0) != vs_flower.partition_indices(1)


def test_pwfl_rounds_charge_the_busiest_agent() -> None:
    """Overhead is round wall minus the busiest agent's summed training; times from round 1."""
    events = []
    for r, t0 in ((1, 100.0), (2, 110.0)):
        events.append({"event": "model_published", "round": r, "ts": t0 + 0.1, "duration_s": 0.1})
        for agent, train in (("a", 2.0), ("a", 3.0), ("b", 4.0)):
            events.append({"event": "update_received", "round": r, "agent_id": agent,
                           "timings": {"train_s": train}})
        events.append({"event": "aggregation_finished", "round": r, "ts": t0 + 5.5})
        events.append({"event": "evaluation_finished", "round": r, "ts": t0 + 7.0,
                       "accuracy": 0.8 + r * 0.03})
    out = vs_flower.pwfl_outcome(events, "x", 0)
    assert out.slowest_train_s == [5.0, 5.0]
    assert out.overhead_s() == pytest.approx(0.5)
    assert out.time_to(0.85) == pytest.approx(17.0)
    assert out.time_to(0.88) is None
    assert out.seconds_per_round() == pytest.approx(8.5)


def _rows(extra: dict[str, dict[str, float | None]] | None = None
          ) -> dict[str, dict[str, float | None]]:
    """Summary rows for `report`: Flower's simulation with its default-like settings,
    PWFL's job "mine", and `extra`; the columns the ratios do not use filled in."""
    rows: dict[str, dict[str, float | None]] = {
        f"flower-sim:{vs_flower.FLOWER_DEFAULTS.label}":
            {"time_to_85_s": 100.0, "round_overhead_s": 0.2}, **(extra or {}),
        "pwfl:mine": {"time_to_85_s": 40.0, "round_overhead_s": 0.05}}
    for row in rows.values():
        row.update({"time_to_80_s": None, "time_to_88_s": None, "seconds_per_round": 1.0,
                    "final_accuracy": 0.9})
    return rows


def test_report_ratios_are_pwfl_over_flower() -> None:
    """The JSON's ratios divide PWFL's default job by Flower's default-like settings."""
    summary = vs_flower.report(_rows(), "mine")
    assert summary["time_to_85_vs_flower_sim"] == 0.4
    assert summary["round_overhead_vs_flower_sim"] == 0.25


def test_skips_with_install_hint_without_flower(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With flwr absent the bench prints how to install it and exits 0."""
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert vs_flower.main(["--quick"]) == 0
    assert "pip install 'pwfl[peer]'" in capsys.readouterr().out


def test_report_gains_deployment_ratios_when_it_ran(capsys: pytest.CaptureFixture[str]) -> None:
    """With a flower-deployment row the JSON adds PWFL's default job over it; keys stay."""
    deployment = {f"flower-deployment:{vs_flower.FLOWER_DEFAULTS.label}":
                  {"time_to_85_s": 400.0, "round_overhead_s": 20.0}}
    summary = vs_flower.report(_rows(deployment), "mine")
    assert summary["time_to_85_vs_flower_sim"] == 0.4
    assert summary["round_overhead_vs_flower_sim"] == 0.25
    assert summary["time_to_85_vs_flower_deployment"] == 0.1
    assert summary["round_overhead_vs_flower_deployment"] == 0.003
    header, *_, mine = capsys.readouterr().out.splitlines()[:4]
    assert "t85 xd" in header
    assert "ovh xd" in header
    assert mine.split()[-4:] == ["0.40", "0.25", "0.10", "0.00"]
    without = vs_flower.report(_rows(), "mine")
    assert "time_to_85_vs_flower_deployment" not in without
    assert "xd" not in capsys.readouterr().out.splitlines()[0]


def test_engines_parse_and_plan() -> None:
    """Default sim keeps the old four runs; deployment adds its rows; bad lists are refused."""
    default = vs_flower.Setting("mine", 1, 32, 0.03, local_steps=80)
    flower = vs_flower.FLOWER_DEFAULTS
    assert vs_flower.build_plan(vs_flower.parse_engines("sim"), default) == [
        ("flower-sim", flower), ("pwfl", flower), ("pwfl", default), ("flower-sim", default)]
    both = vs_flower.build_plan(vs_flower.parse_engines("sim,deployment"), default,
                                deployment_default_job=True)
    assert both[4:] == [("flower-deployment", flower), ("flower-deployment", default)]
    assert [e for e, _ in vs_flower.build_plan(("deployment",), default)] == [
        "pwfl", "pwfl", "flower-deployment"]
    for bad in ("", "sim,sim", "sim,ray"):
        with pytest.raises(argparse.ArgumentTypeError):
            vs_flower.parse_engines(bad)


def test_run_config_round_trips_and_matches_the_app() -> None:
    """The run config carries the whole setting and has exactly the app's config keys."""
    setting = vs_flower.Setting("mine", 2, 16, 0.03, max_steps=7, momentum=0.5, local_steps=80)
    run = runs.FlowerRun("flower-deployment", setting, 3, 20, "/tmp/o.json")
    assert runs.FlowerRun.from_run_config(run.run_config()) == run
    app = tomllib.loads((deployment.APP_DIR / "pyproject.toml").read_text())
    defaults = app["tool"]["flwr"]["app"]["config"]
    assert set(defaults) == set(run.run_config())
    assert runs.FlowerRun.from_run_config(defaults).setting == vs_flower.FLOWER_DEFAULTS


def test_deployment_argv_ports_and_connection(tmp_path: Path) -> None:
    """SuperLink, SuperNodes and `flwr run` get insecure loopback ports, one per process,
    each node its partition, and `flwr run` a TOML run config and the named connection."""
    plan = deployment.Plan.on_free_ports(vs_flower.CLIENTS, tmp_path)
    ports = [plan.superlink_port, *plan.supernode_ports]
    assert len(set(ports)) == vs_flower.CLIENTS + 1
    link = plan.superlink_argv()
    assert link[0].endswith("flower-superlink")
    assert "--insecure" in link
    assert link[link.index("--port") + 1] == str(plan.superlink_port)
    node = plan.supernode_argv(4)
    assert node[node.index("--superlink") + 1] == f"127.0.0.1:{plan.superlink_port}"
    assert node[node.index("--port") + 1] == str(plan.supernode_ports[4])
    assert node[node.index("--node-config") + 1] == "partition-id=4 num-partitions=6"
    run = runs.FlowerRun("flower-deployment", vs_flower.FLOWER_DEFAULTS, 1, 8, "/tmp/o.json")
    argv = plan.flwr_run_argv(run.run_config())
    assert argv[1:5] == ["run", str(deployment.APP_DIR), deployment.CONNECTION, "--stream"]
    overrides = argv[argv.index("--run-config") + 1]
    parsed = tomllib.loads("\n".join(f"{k} = {v}" for k, v in
                                     (pair.split("=", 1) for pair in overrides.split())))
    assert parsed == run.run_config()
    config = tomllib.loads(plan.flower_config_toml())
    conn = config["superlink"][config["superlink"]["default"]]
    assert conn == {"address": f"127.0.0.1:{plan.superlink_port}", "insecure": True}
    assert plan.env()["FLWR_HOME"] == str(tmp_path)


# A stand-in SuperLink: listens, and starts a detached child (its own session) as Flower's
# SuperExec is started, then waits.
_FAKE_SUPERLINK = """
import socket, subprocess, sys, time
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         start_new_session=True)
print("child", child.pid, flush=True)
time.sleep(60)
"""


class _FakePlan(deployment.Plan):
    def superlink_argv(self) -> list[str]:
        return [sys.executable, "-c", _FAKE_SUPERLINK, str(self.superlink_port)]

    def supernode_argv(self, partition: int) -> list[str]:
        return [sys.executable, "-c", "import sys; print('no superlink here'); sys.exit(3)"]


def test_federation_stops_groups_and_detached_children(tmp_path: Path) -> None:
    """A SuperNode that dies at start is reported with its log; the SuperLink and the
    child it detached into its own session are gone afterwards."""
    plan = _FakePlan.on_free_ports(1, tmp_path)
    with pytest.raises(deployment.FlowerProcessError, match="no superlink here"), \
            deployment.Federation(plan):
        pass
    log = (tmp_path / "superlink.log").read_text()
    child = int(log.split()[log.split().index("child") + 1])
    assert child not in deployment._proc_stats()  # gone, or a zombie left to be reaped


def _flower_processes(home: Path) -> list[int]:
    """Live processes whose environment names `home` as FLWR_HOME."""
    marker = f"FLWR_HOME={home}".encode()
    found = []
    for pid in deployment._proc_stats():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            found.append(pid)
    return found


@pytest.mark.slow
@pytest.mark.skipif(data.find_data_dir(environ={}) is None,
                    reason="needs the Fashion-MNIST IDX files")
def test_tiny_deployment_run_measures_and_cleans_up(tmp_path: Path) -> None:
    """One 5-step round on Flower's real deployment engine gives an Outcome, and no Flower
    process is left afterwards."""
    pytest.importorskip("flwr", reason=f"needs Flower: {vs_flower.INSTALL_PEER}")
    from bench.flower_app import engines

    tiny = vs_flower.Setting("tiny", epochs=1, batch_size=32, lr=0.05, local_steps=5)
    out = engines.run_deployment(tiny, 0, 1, tmp_path)
    assert (out.engine, out.setting, len(out.accuracy), len(out.round_wall_s)) == (
        "flower-deployment", "tiny", 1, 1)
    assert 0.0 < out.slowest_train_s[0] < out.round_wall_s[0]
    assert out.eval_end[0] > out.start
    assert _flower_processes(tmp_path / "flower-deployment-tiny-0") == []
