"""`python -m bench.job_sweep`: how the default job's settings were chosen.

An in-process FedAvg (or FedAvgM) simulation with PWFL's own task code: the
Fashion-MNIST CNN, 6 Dirichlet(0.5) clients, every client trained each round by
`FashionMnistTask.train` on one torch thread, the update weighted by partition
size, and the global model evaluated on the full test set after every round. No
framework, no timing noise: it counts rounds and SGD steps, which do not depend
on the machine's load, so settings can be compared while other work runs.

For each setting and partition seed it reports the round that first reached
80/85/88% and the critical-path steps to 85% (the steps the busier of two
trainers takes, clients split largest-first: what a one-machine round waits on),
then mean and standard deviation over seeds. Wall time on a machine is about
critical steps x the time of one step (`bench.trainer_speed`) plus per round the
framework's overhead (`bench.round_overhead`).

Settings are KEY=VALUE lists, separated by spaces: local_steps (0: whole epochs),
epochs, batch_size, lr, momentum, server_lr, server_momentum. Example:

    python -m bench.job_sweep --seeds 0,1,2 --rounds 16 \\
        local_steps=80,batch_size=32,lr=0.03 local_steps=0,epochs=1,batch_size=32,lr=0.05

Last line: one JSON object, per setting the mean rounds and critical steps to 85%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from rich.console import Console
from rich.table import Table

TARGETS = (0.80, 0.85, 0.88)
CLIENTS = 6
ALPHA = 0.5


@dataclass(frozen=True)
class JobSetting:
    local_steps: int = 80
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.03
    momentum: float = 0.9
    server_lr: float = 1.0
    server_momentum: float = 0.0

    @classmethod
    def parse(cls, text: str) -> JobSetting:
        kinds = {f.name: f.type for f in fields(cls)}
        setting = cls()
        try:
            for part in filter(None, text.split(",")):
                key, value = part.split("=", 1)
                kind = int if kinds[key] in ("int", int) else float
                setting = replace(setting, **{key: kind(value)})
        except (KeyError, ValueError):
            raise argparse.ArgumentTypeError(
                f"setting {text!r}: want KEY=VALUE,... with keys {', '.join(kinds)}") from None
        return setting

    def label(self) -> str:
        work = f"{self.local_steps} steps" if self.local_steps else f"{self.epochs} epoch(s)"
        server = (f", server lr {self.server_lr:g} momentum {self.server_momentum:g}"
                  if (self.server_lr, self.server_momentum) != (1.0, 0.0) else "")
        return f"{work}, b{self.batch_size}, lr {self.lr:g}, m {self.momentum:g}{server}"


def simulate(setting: JobSetting, seed: int, rounds: int) -> dict[str, Any]:
    """One run: accuracy after each round and the critical-path steps of each round."""
    import torch

    from trainer_worker.task import TrainConfig
    from trainer_worker.tasks.fashion_mnist import FashionMnistTask

    torch.set_num_threads(1)
    task = FashionMnistTask(num_clients=CLIENTS, alpha=ALPHA, partition_seed=seed)
    model = task.build_model(0)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    velocity = {k: torch.zeros_like(v) for k, v in global_state.items()}
    accuracy: list[float] = []
    critical: list[int] = []
    for round_ in range(1, rounds + 1):
        states, weights, steps = [], [], []
        for client in range(CLIENTS):
            model.load_state_dict(global_state)
            config = TrainConfig(epochs=setting.epochs, batch_size=setting.batch_size,
                                 lr=setting.lr, momentum=setting.momentum,
                                 local_steps=setting.local_steps,
                                 seed=seed * 1000 + round_ * 10 + client)
            outcome = task.train(model, str(client), config, torch.device("cpu"))
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(outcome.num_examples)
            steps.append(int(outcome.metrics["steps"]))
        bins = [0, 0]  # two trainers, clients largest first to the less loaded one
        for work in sorted(steps, reverse=True):
            bins[bins.index(min(bins))] += work
        critical.append(max(bins))
        total = sum(weights)
        for name, old in global_state.items():
            mean = sum(w * s[name].double() for w, s in zip(weights, states, strict=True)) / total
            if not old.is_floating_point():
                global_state[name] = mean.round().to(old.dtype)
                continue
            delta = mean.to(old.dtype) - old
            velocity[name] = setting.server_momentum * velocity[name] + delta
            global_state[name] = old + setting.server_lr * velocity[name]
        model.load_state_dict(global_state)
        accuracy.append(task.evaluate(model, torch.device("cpu"))["accuracy"])
    return {"accuracy": accuracy, "critical_steps": critical}


def first_round(accuracy: list[float], target: float) -> int | None:
    return next((i + 1 for i, a in enumerate(accuracy) if a >= target), None)


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f}±{sd:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.job_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="*", type=JobSetting.parse,
                   help="KEY=VALUE,... per setting (default: PWFL's default job and whole "
                        "epochs at Flower's settings)")
    p.add_argument("--seeds", default="0,1,2", help="partition seeds (default 0,1,2)")
    p.add_argument("--rounds", type=int, default=16, help="rounds per run (default 16)")
    args = p.parse_args(argv)
    settings = args.settings or [JobSetting(), JobSetting(local_steps=0, lr=0.05)]
    seeds = [int(s) for s in args.seeds.split(",")]
    console = Console(stderr=True)
    results: dict[str, list[dict[str, Any]]] = {}
    with console.status("") as status:
        for setting in settings:
            for seed in seeds:
                status.update(f"{setting.label()}, seed {seed}")
                results.setdefault(setting.label(), []).append(
                    simulate(setting, seed, args.rounds))
    table = Table(title=f"Fashion-MNIST, {CLIENTS} clients, Dirichlet({ALPHA}), "
                        f"{args.rounds} rounds, seeds {seeds} (mean±sd)")
    for column in ("setting", "round to 80%", "round to 85%", "round to 88%",
                   "critical steps to 85%", "final accuracy %"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    summary: dict[str, Any] = {}
    for setting in settings:
        runs = results[setting.label()]
        cells = []
        for target in TARGETS:
            got = [first_round(r["accuracy"], target) for r in runs]
            reached = [g for g in got if g is not None]
            cells.append(_mean_sd([float(g) for g in reached]) +
                         ("" if len(reached) == len(got) else f" ({len(reached)}/{len(got)})"))
        to85 = [first_round(r["accuracy"], 0.85) for r in runs]
        steps = [float(sum(r["critical_steps"][:n])) for r, n in zip(runs, to85, strict=True)
                 if n is not None]
        final = [100 * r["accuracy"][-1] for r in runs]
        table.add_row(setting.label(), *cells, _mean_sd(steps), _mean_sd(final))
        summary[setting.label()] = {
            "setting": asdict(setting),
            "rounds_to_85": [n for n in to85],
            "critical_steps_to_85_mean": statistics.fmean(steps) if steps else None,
            "final_accuracy_mean": statistics.fmean(final) / 100}
    Console().print(table)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
