"""What one run of `bench.vs_flower` is, shared by the benchmark, its engine runners and
the Flower App (which imports no more of the benchmark than this): the settings of a
side (`Setting`), a Flower run as its app reads it from run config (`FlowerRun`), and
what a run measured (`Outcome`)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 6
ALPHA = 0.5


@dataclass(frozen=True)
class Setting:
    """Local training settings for one side of a comparison."""

    label: str
    epochs: int
    batch_size: int
    lr: float
    max_steps: int = 0
    momentum: float = 0.9
    local_steps: int = 0  # > 0: a step budget per job (PWFL's default job); epochs unused

    def describe(self) -> str:
        work = (f"{self.local_steps} steps" if self.local_steps else
                f"{self.epochs} epoch(s)" + (f" (max {self.max_steps} steps)"
                                             if self.max_steps else ""))
        return f"{work}, batch {self.batch_size}, lr {self.lr:g}, momentum {self.momentum:g}"

    def train_config(self, seed: int) -> Any:
        from trainer_worker.task import TrainConfig

        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           momentum=self.momentum, max_steps=self.max_steps,
                           local_steps=self.local_steps, seed=seed)


FLOWER_DEFAULTS = Setting("flower-default-like", epochs=1, batch_size=32, lr=0.05)


def pwfl_default_setting() -> Setting:
    """PWFL's default job, as `coordinator.settings.TrainingSettings` has it."""
    from coordinator.settings import TrainingSettings

    t = TrainingSettings()
    return Setting("pwfl-default-job", epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                   max_steps=t.max_steps, momentum=t.momentum, local_steps=t.local_steps)


@dataclass
class Outcome:
    """One run: per-round eval times and accuracies, round walls and client train times."""

    engine: str
    setting: str
    seed: int
    start: float = 0.0  # round 1 begins
    eval_end: list[float] = field(default_factory=list)  # after round r (index r-1)
    accuracy: list[float] = field(default_factory=list)
    round_wall_s: list[float] = field(default_factory=list)  # sent out .. aggregated
    slowest_train_s: list[float] = field(default_factory=list)  # busiest trainer
    # Testbed runs: bytes over the silos' links, and the emulated training calls (overran:
    # real compute longer than the nominal device time, so the emulation failed for them).
    link: dict[str, int] | None = None
    emulated_calls: int = 0
    emulated_overran: int = 0

    def link_mb_per_round(self) -> float | None:
        if self.link is None or not self.eval_end:
            return None
        return (self.link["download_bytes"] + self.link["upload_bytes"]) / 1e6 / len(self.eval_end)

    def time_to(self, target: float) -> float | None:
        for t, acc in zip(self.eval_end, self.accuracy, strict=True):
            if acc >= target:
                return t - self.start
        return None

    def seconds_per_round(self) -> float:
        return (self.eval_end[-1] - self.start) / max(len(self.eval_end), 1)

    def overhead_s(self) -> float:
        """Median over rounds after the first (warm-up) of wall minus slowest training."""
        pairs = list(zip(self.round_wall_s, self.slowest_train_s, strict=True))
        later = pairs[1:] or pairs
        return statistics.median(w - t for w, t in later)


@dataclass(frozen=True)
class FlowerRun:
    """One Flower run as its Flower App reads it: the run config `flwr run` passes."""

    engine: str  # "flower-sim" or "flower-deployment": the Outcome's engine
    setting: Setting
    seed: int
    rounds: int
    out: str  # where the ServerApp writes the Outcome as JSON ("" = nowhere)

    def run_config(self) -> dict[str, bool | int | float | str]:
        """The keys of the app's [tool.flwr.app.config], in its kebab-case."""
        s = self.setting
        return {"engine": self.engine, "label": s.label, "epochs": s.epochs,
                "batch-size": s.batch_size, "lr": float(s.lr), "momentum": float(s.momentum),
                "max-steps": s.max_steps, "local-steps": s.local_steps, "seed": self.seed,
                "rounds": self.rounds, "out": self.out}

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> FlowerRun:
        setting = Setting(str(config["label"]), int(config["epochs"]),
                          int(config["batch-size"]), float(config["lr"]),
                          max_steps=int(config["max-steps"]), momentum=float(config["momentum"]),
                          local_steps=int(config["local-steps"]))
        return cls(str(config["engine"]), setting, int(config["seed"]), int(config["rounds"]),
                   str(config["out"]))
