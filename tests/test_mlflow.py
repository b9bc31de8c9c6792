"""A run logged to MLflow (--mlflow, or python -m replay --to-mlflow RUN_DIR) reads back
through MLflow's own client: a parent run and one child per slot with its curves."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from replay.tracking import export
from tests.e2e import ROOT, Run
from tests.test_replay_population import CONFIGS, _population_log

pytest.importorskip("mlflow")
# MLflow 3.17's SQLite store uses SQLAlchemy 2.1's deprecated `noload`: its noise, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


def _runs(uri: str) -> tuple[Any, list[Any]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("pwfl")
    return client, client.search_runs([experiment.experiment_id])


def test_pbt_events_become_tags_on_their_slots_child_run(tmp_path: Path) -> None:
    """From a log alone: one child per slot (not the merged pseudo-slot) with its configuration
    as params and its test accuracy per round; an exploit and an explore are tags with the
    replay's readable line, and event metrics at their round."""
    uri = f"sqlite:///{tmp_path}/store.db"
    export(_population_log(tmp_path), uri=uri)
    client, runs = _runs(uri)
    children = {r.data.tags["pwfl.slot_id"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert sorted(children) == ["0", "1", "2"]
    assert [children[s].data.params["lr"] for s in "012"] == [str(c["lr"]) for c in CONFIGS]
    tags = children["2"].data.tags
    assert "<- copies slot 1 round 2" in tags["event.0002.pbt_exploit"]
    assert "lr 0.03->0.036" in tags["event.0002.pbt_explore"]
    assert tags["pwfl.pbt_exploits"] == "1"
    history = client.get_metric_history(children["0"].info.run_id, "test_accuracy")
    assert [m.step for m in history] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_pbt_run_logs_a_parent_and_a_child_per_slot_with_curves_and_events(
        launch: Callable[..., Run], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--mlflow: a parent run (settings as params), a child per slot (its configuration as
    params, test accuracy and loss per round, its clients' train loss, its PBT exploits as
    tags, its final model as an artifact); logging it again replaces, not duplicates."""
    uri = f"sqlite:///{tmp_path}/store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run = launch("tracked", "--task", "synthetic", "--clients", "4", "--local-agents", "1",
                 "--rounds", "3", "--local-steps", "3", "--sweep", "lr=0.005,0.2",
                 "--population", "pbt", "--pbt-every", "1", "--mlflow")
    assert run.wait(200) == 0, run.output()[-2000:]
    client, runs = _runs(uri)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["pwfl.slot_id"]: r for r in runs if r not in [parent]}
    assert parent.data.params["population"] == "pbt"
    assert {c.data.tags["mlflow.parentRunId"] for c in children.values()} == {parent.info.run_id}
    assert [children[s].data.params["lr"] for s in ("0", "1")] == ["0.005", "0.2"]
    for slot_id, child in children.items():
        history = client.get_metric_history(child.info.run_id, "test_accuracy")
        # every evaluated round, in order; with several slots a round whose evaluation a
        # newer round overtook is skipped by design (a loaded machine), never the last
        evaluated = [e["round"] for e in run.events("evaluation_finished")
                     if str(e["slot_id"]) == slot_id]
        skipped = {e["round"] for e in run.events("evaluation_skipped")
                   if str(e["slot_id"]) == slot_id}
        assert [m.step for m in history] == sorted(evaluated)
        assert set(evaluated) | skipped == {1, 2, 3}
        assert 3 in evaluated
        assert {"test_loss", "train_loss"} <= set(child.data.metrics)
        exploits = [e for e in run.events("pbt_exploit") if str(e["slot_id"]) == slot_id]
        tags = [k for k in child.data.tags if k.endswith(".pbt_exploit")]
        assert len(tags) == len({e["round"] for e in exploits})
        [model] = client.list_artifacts(child.info.run_id, "model")
        assert model.path == "model/round00003.pwfl"
    subprocess.run([sys.executable, "-m", "replay", "--to-mlflow", str(run.events_path.parent)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert len(_runs(uri)[1]) == 3
