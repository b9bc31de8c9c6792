"""`python -m coordinator`: the command line, the embedded Redis, and the event loop."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from coordinator import runfile, security
from coordinator.population import options as population_options
from coordinator.settings import (
    TASK_ALIASES,
    CoordinatorSettings,
    TrainingSettings,
    new_run_id,
)
from serialization.errors import TaskError
from serialization.tasks import takes_option

DESCRIPTION = """\
Run a PWFL federated training job: several independent global models ("weight
slots") train at once on disjoint subsets of the clients, so that while one
slot aggregates and evaluates, the others' clients keep training.

With no --redis URL a private redis-server is started for this run (embedded
default) and --local-agents N starts N client agents on this machine. For real
silos, start Redis yourself, pass --redis, and run `python -m client_agent` on
each silo host.
"""

EPILOG = """\
examples:
  python -m coordinator --slots 3 --local-agents 2          # the default job, one machine
  python -m coordinator --slots 1 --local-agents 2          # the same with one model, to compare
  python -m coordinator --task synthetic --rounds 20 --local-agents 2 --clients 4
  python -m coordinator --redis rediss://redis.example:6380 --clients 12 --slots 4
  python -m coordinator --resume 20261123-101500-ab12 --local-agents 2

Events go to runs/RUN_ID/events.jsonl; `python -m replay` reads them.
Live status: http://127.0.0.1:8765/status while a run is going.

exit status: 0 every slot finished; 1 stopped (POST /stop) or unfinished; 2 an
error to fix first (the message says which; Redis gone past --redis-outage-s:
then --resume); 78 Redis refused the login, a command (ACL) or TLS, which no
retry fixes; 130 Ctrl-C; 143 SIGTERM.
"""


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _non_negative(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m coordinator", description=DESCRIPTION,
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_job_options(p.add_argument_group("job"))
    _add_schedule_options(p.add_argument_group("scheduling and quorum"))
    _add_training_options(p.add_argument_group(
        "local training (sent with every job)", textwrap.fill(
        "The default job, chosen by measurement (docs/default-job.md): every client takes 80 "
        "SGD steps of batch 32 at lr 0.03 per round, so no round waits on the client with the "
        "biggest partition; about 2,000 steps on the busier of two trainers reach 85% on "
        "Fashion-MNIST/Dirichlet(0.5) with one slot, half the work of whole epochs.", 78)))
    _add_gradient_options(p.add_argument_group(
        "batch-gradient federation", "each step every leased client sends the gradient of one "
        "batch (--batch-size) on the slot's current weights; the slot takes one optimiser step "
        "on their batch-size weighted mean and broadcasts the new weights"))
    _add_infra_options(p.add_argument_group("infrastructure"))
    security.add_options(p.add_argument_group("security", security.GROUP_DESCRIPTION))
    population_options.add_options(p.add_argument_group(
        "per-slot configuration, PBT and merging", population_options.GROUP_DESCRIPTION))
    return p


def _add_job_options(g: argparse._ArgumentGroup) -> None:
    _add_task_options(g)
    _add_strategy_options(g)


def _add_task_options(g: argparse._ArgumentGroup) -> None:
    runfile.add_option(g)
    g.add_argument("--slots", type=_positive(int), default=None,
                   help="weight slots: independent global models trained at once (default 3, "
                        "or one per --slot-config table / --sweep point)")
    g.add_argument("--rounds", type=_positive(int), default=20,
                   help="rounds per slot (default 20; the default job on two cores: about a "
                        "minute)")
    g.add_argument("--clients", type=_positive(int), default=6, dest="expected_clients",
                   help="clients to wait for before starting; also the data partition count "
                        "(default 6)")
    g.add_argument("--task", default="fashion_mnist",
                   help=f"task: {', '.join(TASK_ALIASES)}, an import path module:factory, or "
                        "flower:module:client_fn for a Flower NumPyClient's client_fn run "
                        "unchanged (docs/from-flower.md) (default fashion_mnist); agents run "
                        "a module:factory or flower:... only if their "
                        "operator allows it (client_agent --allow-task), --local-agents are "
                        "given it")
    g.add_argument("--task-option", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="task option, e.g. alpha=0.5, data_dir=/data, download=true (repeatable)")


def _add_strategy_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--strategy", default="fedavg",
                   help="aggregation: fedavg, fedavgm, fedadam, fedyogi, fedadagrad, median, "
                        "trimmed_mean, krum, bulyan, geomed (alias rfa), or module:Class "
                        "(default fedavg). median, trimmed_mean, bulyan, krum's choice and "
                        "geomed count each update once: num_examples is the client's own "
                        "claim and their bounds count updates, so they ignore it and the "
                        "staleness weight of late updates (use --late-policy drop to keep "
                        "late updates out); multi-krum's average of its picks, and geomed "
                        "with weighted=true, weight by num_examples x staleness (counts "
                        "capped at each client's declared size and its job's steps x batch). "
                        "A round with too few updates for krum, bulyan or trimmed_mean takes "
                        "the median or keeps the model, and logs strategy_bounds_unmet. "
                        "Options, defaults and papers: docs/strategies.md")
    g.add_argument("--strategy-option", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="strategy option, value parsed as JSON, e.g. eta=0.01, "
                        "num_byzantine=2, flower_compat=true (repeatable; default: the "
                        "strategy's own defaults). fedavgm: server_lr, momentum, nesterov; "
                        "fedadam/fedyogi/fedadagrad: eta, eta_l, beta_1, beta_2, tau, "
                        "flower_compat (Flower 1.41's v0=0 and bias correction); "
                        "krum: num_byzantine, num_selected, fallback; bulyan: num_byzantine, "
                        "fallback; trimmed_mean: beta, num_byzantine, fallback; "
                        "geomed: nu, max_iter, eps, weighted")
    g.add_argument("--seed", type=int, default=0,
                   help="run seed: slot i starts from model seed SEED+i (default 0)")
    g.add_argument("--resume", metavar="RUN_ID",
                   help="continue a stopped run from its last checkpoints")


def _add_schedule_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--policy", choices=("partition", "greedy"), default="partition",
                   help="partition: random disjoint split of idle clients among waiting slots; "
                        "greedy: a freed client goes to the slot waiting longest "
                        "(default partition)")
    g.add_argument("--client-choice", choices=("least-used", "rotate", "policy-order"),
                   default="least-used",
                   help="when a slot can choose among idle clients, take those it trained with "
                        "least (better coverage of non-IID data) or keep the policy's order; "
                        "rotate: least-used, and a slot whose only idle candidates are its "
                        "previous round's clients waits while another slot trains, to swap "
                        "(with several slots, slots otherwise keep the same clients for most "
                        "rounds) (default least-used)")
    g.add_argument("--clients-per-round", type=int, default=0,
                   help="most clients one slot leases per round (default ceil(clients/slots))")
    g.add_argument("--min-clients", type=_positive(int), default=1,
                   help="fewest updates that make a round (default 1)")
    g.add_argument("--quorum", type=float, default=1.0,
                   help="fraction of a round's clients to wait for; 1.0 is the fully "
                        "synchronous parameter server (default 1.0)")
    g.add_argument("--deadline", type=_positive(float), default=600.0, dest="deadline_s",
                   help="seconds a round waits for its quorum before closing with what it "
                        "has (at least --min-clients) (default 600)")
    g.add_argument("--late-policy", choices=("drop", "fold"), default="drop",
                   help="an update whose round closed: drop it, or fold it into the slot's "
                        "next round with a staleness weight (default drop)")
    g.add_argument("--staleness", choices=("inverse", "constant", "exp"), default="inverse",
                   help="staleness weight of folded late updates: 1/(1+s), 1, or 0.5^s")


def _add_training_options(g: argparse._ArgumentGroup) -> None:
    d = TrainingSettings()
    g.add_argument("--local-steps", type=_non_negative(int), default=None, metavar="STEPS",
                   help=f"SGD steps each client takes per job, cycling through its data as "
                        f"often as needed: every client does the same work, so no round waits "
                        f"on the biggest partition (default {d.local_steps}; 0, or --epochs / "
                        f"--max-steps without --local-steps: whole epochs)")
    g.add_argument("--epochs", type=_positive(int), default=None,
                   help=f"train whole epochs of each client's data instead of --local-steps "
                        f"(default {d.epochs} when --local-steps is 0)")
    g.add_argument("--batch-size", type=_positive(int), default=d.batch_size,
                   help=f"(default {d.batch_size})")
    g.add_argument("--lr", type=_positive(float), default=d.lr,
                   help=f"client SGD learning rate (default {d.lr:g})")
    g.add_argument("--momentum", type=float, default=d.momentum,
                   help=f"client SGD momentum, reset every job (default {d.momentum:g})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"(default {d.weight_decay:g})")
    g.add_argument("--proximal-mu", type=float, default=d.proximal_mu,
                   help="FedProx proximal term on the clients (0: plain FedAvg)")
    g.add_argument("--max-steps", type=_non_negative(int), default=None,
                   help="with whole epochs: cap on local steps per job (0: no cap); given "
                        "alone it means epochs mode")
    g.add_argument("--noop-training", action="store_true",
                   help="clients return the weights they received (framework overhead runs)")


def _add_gradient_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--mode", choices=("weights", "gradient"), default="weights",
                   help="weights: clients train locally and send weights (default); gradient: "
                        "every slot runs batch-gradient federation")
    g.add_argument("--gradient-slots", type=int, default=0, metavar="N",
                   help="with --mode weights: the first N slots run gradient mode beside the "
                        "weight slots (default 0)")
    g.add_argument("--gradient-steps", type=_positive(int), default=50, metavar="STEPS",
                   help="gradient mode: optimiser steps per lease, i.e. per round; evaluation "
                        "and checkpoints come after each round (default 50)")
    g.add_argument("--server-optimizer", choices=("sgd", "adam"), default="sgd",
                   help="gradient mode: the slot's optimiser; --lr, --weight-decay and (SGD) "
                        "--momentum set it (default sgd)")
    g.add_argument("--server-option", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="gradient mode, repeatable: sgd lr, momentum, dampening, nesterov, "
                        "weight_decay; adam lr, beta1, beta2, eps, weight_decay, amsgrad "
                        "(torch's meaning; override --lr and friends)")


def _add_infra_options(g: argparse._ArgumentGroup) -> None:
    _add_process_options(g)
    _add_output_options(g)


def _add_process_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--redis", dest="redis_url", metavar="URL",
                   help="redis://, rediss:// or unix:// URL (default: start a private "
                        "redis-server for this run)")
    g.add_argument("--local-agents", type=int, default=0,
                   help="start this many client agents on this machine (default 0)")
    g.add_argument("--no-local-handoff", dest="local_handoff", action="store_false",
                   help="move every model and update through Redis, also for agents on this "
                        "host (default: agents that prove they share this host's /dev/shm hand "
                        "models and updates over in shared memory; others always use Redis). "
                        "Use it to measure the Redis path, or where /dev/shm cannot hold a "
                        "few models")
    g.add_argument("--local-devices", default="cpu",
                   help="devices of each local agent, e.g. cpu or cuda:0,cuda:1 (default cpu)")
    g.add_argument("--local-threads", type=_positive(int), default=1,
                   help="torch threads per local trainer (default 1)")
    g.add_argument("--runs-dir", type=Path, default=Path("runs"),
                   help="where runs keep events, checkpoints and state (default ./runs)")
    g.add_argument("--log-file", type=Path,
                   help="JSON event log (default RUNS_DIR/RUN_ID/events.jsonl)")
    g.add_argument("--log-level", default="warning",
                   choices=("debug", "info", "warning", "error"),
                   help="events shown on the terminal (all go to the log file) (default warning)")
    g.add_argument("--http-host", default="127.0.0.1")
    g.add_argument("--http-port", type=int, default=8765, help="status API port (0: any free)")
    g.add_argument("--wait-clients", type=_positive(float), default=300.0, dest="wait_clients_s",
                   help="seconds to wait for --clients to register before starting with fewer")


def _add_output_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--eval", choices=EVALUATIONS, default="both", dest="evaluation",
                   help="federated: each job first evaluates the model it received on its "
                        "client's held-out validation split (--val-fraction) and reports it "
                        "with its update; a slot's validation accuracy for a round is the "
                        "example-weighted mean over its clients; PBT and --merge "
                        "final decide on it. central: the coordinator evaluates on the task's "
                        "test set (every --eval-every rounds and after the last), for "
                        "reporting. both: federated every round and central as said (default "
                        "both; with central alone, decisions fall back to test-set figures)")
    g.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help="share of each client's partition held out for federated evaluation, "
                        "never trained on, fixed by the partition seed; passed to tasks that "
                        "take a val_fraction option (the built-in ones) (default 0.1)")
    g.add_argument("--eval-every", type=int, default=1,
                   help="central evaluation every N rounds (and after the last); 0 never "
                        "(default 1)")
    g.add_argument("--eval-threads", type=_positive(int), default=1,
                   help="torch threads for evaluation on the coordinator (default 1)")
    g.add_argument("--eval-nice", type=_non_negative(int), default=None, metavar="N",
                   help="run evaluations N nice steps below the trainers (Linux), so that on "
                        "a machine shared with local agents they take the CPU the trainers "
                        "leave; a round whose evaluation a newer round overtook is skipped, "
                        "every reported accuracy is on the full test set (default: 0 with one "
                        "slot, 10 with several, whose evaluations multiply with the slots)")
    g.add_argument("--keep-checkpoints", type=_positive(int), default=2,
                   help="model checkpoints kept per slot (default 2)")
    g.add_argument("--run-id", help="name for a new run (default: time-based)")
    g.add_argument("--no-progress", action="store_true", help="no live table on the terminal")
    g.add_argument("--mlflow", action="store_true",
                   help="when the run ends, log it to MLflow (python -m replay --to-mlflow "
                        "RUN_DIR does the same later): a parent run, a child per slot with "
                        "its configuration, per-round accuracy and losses, PBT and merge "
                        "events and final model; $MLFLOW_TRACKING_URI, else "
                        "sqlite:///RUNS_DIR/mlflow.db (needs pip install 'pwfl[mlflow]'; "
                        "default: off)")
    g.add_argument("--summary-json", action="store_true",
                   help="print the final summary as one JSON line on stdout")


TRAINING_FIELDS = ("batch_size", "lr", "momentum", "weight_decay", "proximal_mu")
SETTINGS_FIELDS = ("rounds", "expected_clients", "clients_per_round", "min_clients",
                   "policy", "client_choice", "quorum", "deadline_s", "late_policy",
                   "staleness", "strategy",
                   "seed", "redis_url", "runs_dir", "log_file", "http_host", "http_port",
                   "wait_clients_s", "eval_threads", "eval_every", "eval_nice", "evaluation",
                   "keep_checkpoints", "local_agents", "local_handoff", "local_devices",
                   "local_threads",
                   "mode", "gradient_slots", "gradient_steps", "server_optimizer")


def settings_from_args(args: argparse.Namespace) -> CoordinatorSettings:
    """Settings for a new run from parsed arguments (validated)."""
    training = training_from_args(args)
    settings = CoordinatorSettings(
        run_id=args.run_id or new_run_id(), training=training,
        task=TASK_ALIASES.get(args.task, args.task),
        task_options=validation_task_options(args), strategy_options=dict(args.strategy_option),
        server_options=dict(args.server_option),
        progress=not args.no_progress, **{f: getattr(args, f) for f in SETTINGS_FIELDS},
        **population_options.settings_fields(args, training),
        **{k: v for k, v in security.settings_fields(args, os.environ).items() if v is not None})
    _validate(settings)
    return settings


EVALUATIONS = ("both", "federated", "central")
DEFAULT_VAL_FRACTION = 0.1


def validation_task_options(args: argparse.Namespace) -> dict[str, Any]:
    """--task-option, with `val_fraction` (--val-fraction, default 0.1) added for a task whose
    factory takes it; an explicit --val-fraction for a task that does not is an error."""
    options = dict(args.task_option)
    asked = args.val_fraction
    if asked is not None and not 0.0 <= asked < 1.0:
        raise SystemExit(f"--val-fraction must be in [0, 1), got {asked}")
    task = TASK_ALIASES.get(args.task, args.task)
    if "val_fraction" in options or ":" not in task:
        return options
    try:
        takes = takes_option(task, "val_fraction")
    except TaskError as exc:
        raise SystemExit(f"--task {args.task!r}: {exc}") from None
    if takes:
        options["val_fraction"] = DEFAULT_VAL_FRACTION if asked is None else asked
    elif asked is not None:
        raise SystemExit(f"--val-fraction: task {task!r} takes no val_fraction option (its "
                         f"clients hold out no validation split; federated evaluation needs "
                         f"its own Task.validate)")
    return options


def training_from_args(args: argparse.Namespace) -> TrainingSettings:
    """The job's local training: a step budget unless --epochs or --max-steps ask for epochs."""
    d = TrainingSettings()
    epochs_asked = args.epochs is not None or args.max_steps is not None
    local_steps = args.local_steps if args.local_steps is not None else (
        0 if epochs_asked else d.local_steps)
    return TrainingSettings(**{f: getattr(args, f) for f in TRAINING_FIELDS},
                            epochs=args.epochs or d.epochs, max_steps=args.max_steps or 0,
                            local_steps=local_steps, noop=args.noop_training)


def _validate(s: CoordinatorSettings) -> None:
    if not 0.0 < s.quorum <= 1.0:
        raise SystemExit(f"--quorum must be in (0, 1], got {s.quorum}")
    if ":" not in s.task:
        raise SystemExit(f"--task {s.task!r}: use {', '.join(TASK_ALIASES)} or module:factory")
    if s.mode == "gradient" or s.gradient_slots:
        _validate_gradient(s)
    if s.min_clients > s.round_size:
        raise SystemExit(f"--min-clients {s.min_clients} exceeds clients per round "
                         f"{s.round_size}")


def _validate_gradient(s: CoordinatorSettings) -> None:
    from coordinator.gradient.optimizer import OptimizerError, ServerOptimizer

    try:
        ServerOptimizer(s.server_optimizer, s.server_optimizer_options())
    except OptimizerError as exc:
        raise SystemExit(f"--server-option: {exc}") from None
    if s.population != "none" or s.merge != "none" or any(s.slot_overrides):
        raise SystemExit("--population, --merge, --slot-config and --sweep work on weight slots "
                         "only; gradient mode (--mode gradient, --gradient-slots) has its own "
                         "optimiser options (--server-optimizer, --server-option)")


def resume_settings(args: argparse.Namespace) -> tuple[CoordinatorSettings, dict[str, Any]]:
    state_path = args.runs_dir / args.resume / "state.json"
    if not state_path.exists():
        raise SystemExit(f"--resume {args.resume}: no {state_path} (is --runs-dir right?)")
    state = json.loads(state_path.read_text())
    overrides = {"redis_url": args.redis_url, "local_agents": args.local_agents,
                 "progress": not args.no_progress, "http_port": args.http_port,
                 **{k: v for k, v in security.settings_fields(args, os.environ).items()
                    if v is not None}}
    settings = CoordinatorSettings.from_json(json.dumps(state["settings"]), **overrides)
    return settings, state


@contextlib.contextmanager
def redis_for(settings: CoordinatorSettings) -> Iterator[CoordinatorSettings]:
    """The given Redis, or a private redis-server for the duration of the run."""
    if settings.redis_url:
        yield settings
        return
    from bus.embedded import EmbeddedRedis

    with EmbeddedRedis(unix_socket=True) as server:
        yield _replace(settings, redis_url=server.url)


def _replace(settings: CoordinatorSettings, **changes: Any) -> CoordinatorSettings:
    import dataclasses

    return dataclasses.replace(settings, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = runfile.parse_args(parser, argv)
    resume_state = None
    if args.resume:
        settings, resume_state = resume_settings(args)
    else:
        settings = settings_from_args(args)
        runfile.write(settings.run_dir, runfile.resolved(args, settings, parser))
    from coordinator.run import run_coordinator
    from serialization.events import configure_events

    configure_events("coordinator", log_file=settings.events_path, console_level=args.log_level)
    secrets = security.load_secrets(args, settings, os.environ)
    with redis_for(settings) as ready:
        code = run_coordinator(ready, resume_state=resume_state, summary_json=args.summary_json,
                               secrets=secrets)
    if args.mlflow:  # from the event log, as `python -m replay --to-mlflow RUN_DIR` does
        from replay.tracking import export_after_run

        export_after_run(settings.run_dir)
    return code


if __name__ == "__main__":
    sys.exit(main())
