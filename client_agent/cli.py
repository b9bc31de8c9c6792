"""`python -m client_agent`: one agent per machine, hosting its clients' training."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from bus.connection import refused
from bus.credentials import (
    CLIENT_KEYS_ENV,
    REDIS_PASSWORD_ENV,
    REDIS_PASSWORD_FILE_ENV,
    Keyring,
    add_redis_options,
    redis_option_values,
    secret_from,
)
from bus.errors import EXIT_REFUSED, CredentialsError
from client_agent.limits import MIN_AUTO_LIMIT_S
from client_agent.settings import AgentSettings
from serialization.events import configure_events
from serialization.tasks import BUILTIN_TASKS, task_spec
from trainer_worker.emulation import ENV as EMULATION_ENV
from trainer_worker.emulation import EmulatedDevice, EmulationError

DESCRIPTION = """\
Serve PWFL jobs for the clients this machine hosts. The agent registers its
clients with the coordinator through Redis, heartbeats, fetches each model
once (cached by digest and shared by all local trainers), trains on a pool of
trainer processes (one per --devices entry) and uploads each update.

The first SIGTERM/Ctrl-C stops taking jobs and finishes those in hand; a
second one exits at once (unfinished jobs stay pending and are picked up by a
replacement agent for the same clients).
"""

EPILOG = """\
examples:
  python -m client_agent --redis redis://coordinator:6379 --clients 0,1,2 --devices cpu
  python -m client_agent --redis rediss://redis.example:6380 --clients 7 --devices cuda:0,cuda:1
  PWFL_REDIS_PASSWORD_FILE=silo-a.pw python -m client_agent --redis rediss://redis.example:6380 \\
      --redis-user silo-a --redis-ca-file ca.crt --client-keys keys/ --clients 0,1,2 \\
      --allow-task mysilo.tasks:XrayTask

exit status: 0 stopped or done; 78 Redis refused the login, a command (ACL) or
TLS (one line says what to check; retrying cannot fix it); 130 a second signal.
"""

log = structlog.get_logger()

SECURITY = f"""\
Secrets are read from files or the environment, never from the command line.
Redis password: --redis-password-file, ${REDIS_PASSWORD_FILE_ENV} or ${REDIS_PASSWORD_ENV}.
Signing keys: --client-keys DIR (or ${CLIENT_KEYS_ENV}) holding CLIENT_ID.key for each
hosted client; without it results are not signed (the single-machine default), and
a coordinator that checks signatures rejects them."""

TRAIN_TIMEOUT_HELP = (
    "kill and restart a trainer whose training call takes longer than this, and report the "
    "job failed (train_timeout), so a stuck call does not hold the agent's other clients. "
    "Default: the time left to the job's round deadline plus one more round deadline (a late "
    f"update can still be folded into the next round), at least {MIN_AUTO_LIMIT_S:g} s. Give "
    "it when you know how long training takes")


def _devices(text: str) -> tuple[str, ...]:
    devices = tuple(part.strip() for part in text.split(",") if part.strip())
    if not devices:
        raise argparse.ArgumentTypeError("give at least one device")
    for device in devices:
        if device != "cpu" and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise argparse.ArgumentTypeError(f"device {device!r} is not cpu or cuda:N")
    return devices


def _ids(text: str) -> tuple[str, ...]:
    ids = tuple(part.strip() for part in text.split(",") if part.strip())
    if not ids:
        raise argparse.ArgumentTypeError("give at least one id")
    if len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"duplicate ids in {text!r}")
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m client_agent", description=DESCRIPTION,
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis", required=True, metavar="URL",
                   help="redis://, rediss:// or unix:// URL of the run's Redis")
    p.add_argument("--clients", required=True, type=_ids, metavar="IDS",
                   help="comma-separated client ids hosted here, e.g. 0,1,2")
    p.add_argument("--devices", type=_devices, default=("cpu",), metavar="DEVICES",
                   help="one trainer process per entry: cpu,cpu or cuda:0,cuda:1 (default cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per trainer (default 1)")
    p.add_argument("--run-id", help="serve this run only (default: follow the active run)")
    p.add_argument("--agent-id", default="", help="name in logs and registrations "
                                                  "(default HOSTNAME-PID)")
    p.add_argument("--exit-when-done", action="store_true",
                   help="exit when the run finishes instead of waiting for the next one")
    p.add_argument("--exit-with-parent", action="store_true",
                   help="exit when the process that started this agent exits (local agents)")
    p.add_argument("--log-file", help="JSON event log for this agent and its trainers")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("--heartbeat-ttl-ms", type=int, default=5000,
                   help="clients count as lost this long after the last heartbeat")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds to finish jobs in hand on shutdown (default 60)")
    p.add_argument("--reclaim-idle-ms", type=int, default=60_000,
                   help="take over jobs another agent for these clients left pending this "
                        "long (a dead agent's jobs) (default 60000)")
    p.add_argument("--train-timeout-s", type=_positive, metavar="SECONDS",
                   help=TRAIN_TIMEOUT_HELP)
    p.add_argument("--allow-task", action="append", type=_task_spec, default=[], metavar="SPEC",
                   help="also run jobs of this task (module:factory, or a built-in name); "
                        "repeatable. The built-in tasks "
                        f"({', '.join(BUILTIN_TASKS)}) are always allowed; a job naming any "
                        "other task is refused (logged as job_refused, reported failed as "
                        "task_not_allowed) and its code is never imported")
    p.add_argument("--no-local-handoff", dest="local_handoff", action="store_false",
                   help="fetch models from and upload updates to Redis even when the "
                        "coordinator runs on this host (default: with a coordinator that "
                        "proves it shares this host's /dev/shm, models and updates are "
                        "handed over in shared memory instead; others always use Redis). Use "
                        "it where /dev/shm cannot hold a few models, or to test the Redis path")
    p.add_argument("--emulate-device", type=_emulated_device, metavar="step_s=S[,slowdown=K]",
                   help="EMULATION, for benchmarks only: pad every training call with sleep to "
                        "S seconds per step times K (a device K times slower than one taking S "
                        "per step); each call logs device_emulated, with overran=true when the "
                        "real compute took longer (default: off, real compute time)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics (jobs, trainer restarts, model cache hits, "
                        "shared memory) at http://HOST:PORT/metrics; 0 picks a free port "
                        "(default: off; silo hosts are often outbound-only)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address for --metrics-port (default 127.0.0.1: a Prometheus on "
                        "this host; 0.0.0.0 to be scraped from elsewhere)")
    _add_security_options(p.add_argument_group("security", SECURITY))
    return p


def _task_spec(text: str) -> str:
    spec = task_spec(text.strip())
    module, _, factory = spec.partition(":")
    if not module or not factory:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a built-in task ({', '.join(BUILTIN_TASKS)}) nor module:factory")
    return spec


def _emulated_device(text: str) -> EmulatedDevice:
    try:
        return EmulatedDevice.parse(text)
    except EmulationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _add_security_options(g: argparse._ArgumentGroup) -> None:
    add_redis_options(g)
    g.add_argument("--client-keys", type=Path, metavar="DIR",
                   help="directory with CLIENT_ID.key for each client hosted here")


def _security_fields(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """Redis login and signing keys, read now (SystemExit when a secret cannot be used)."""
    keys_dir = args.client_keys or (Path(environ[CLIENT_KEYS_ENV])
                                    if environ.get(CLIENT_KEYS_ENV) else None)
    try:
        password = secret_from(args.redis_password_file, environ, REDIS_PASSWORD_ENV,
                               REDIS_PASSWORD_FILE_ENV)
        keyring = None if keys_dir is None else Keyring.from_dir(keys_dir, args.clients)
    except CredentialsError as exc:
        raise SystemExit(f"error: {exc}") from None
    given = {k: v for k, v in redis_option_values(args, environ).items() if v is not None}
    return {**given, "redis_password": password, "keyring": keyring}


def settings_from_args(args: argparse.Namespace,
                       environ: Mapping[str, str] | None = None) -> AgentSettings:
    security = _security_fields(args, os.environ if environ is None else environ)
    return AgentSettings(**security,
                         redis_url=args.redis, client_ids=args.clients, devices=args.devices,
                         run_id=args.run_id, agent_id=args.agent_id, threads=args.threads,
                         log_file=args.log_file, exit_when_done=args.exit_when_done,
                         exit_with_parent=args.exit_with_parent,
                         heartbeat_ttl_ms=args.heartbeat_ttl_ms,
                         drain_timeout_s=args.drain_timeout,
                         reclaim_idle_ms=args.reclaim_idle_ms,
                         train_timeout_s=args.train_timeout_s,
                         local_handoff=args.local_handoff,
                         emulated_device=args.emulate_device,
                         allowed_tasks=frozenset([*BUILTIN_TASKS.values(), *args.allow_task]))


async def _run(settings: AgentSettings) -> None:
    from client_agent.agent import Agent

    agent = Agent(settings)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    signals = {"count": 0}

    def on_signal(name: str) -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            agent.request_stop(name)
        else:
            main_task.cancel()  # second signal: leave now; pending jobs get reclaimed

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    await agent.run()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until stopped: 0, 130 on a second signal, EXIT_REFUSED (78) when Redis refuses
    the agent (login, ACL or TLS: no use retrying; the message says what to check)."""
    args = build_parser().parse_args(argv)
    configure_events("agent", log_file=args.log_file, console_level=args.log_level)
    settings = settings_from_args(args)  # after the events: secret-file warnings are logged
    if settings.emulated_device is not None:  # read by the spawned trainers at their start
        os.environ[EMULATION_ENV] = settings.emulated_device.to_text()
    if args.metrics_port is not None:
        from client_agent.metrics import serve_metrics

        serve_metrics(args.metrics_host, args.metrics_port)  # a daemon thread, ends with us
    factory: Callable[[], asyncio.AbstractEventLoop]
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = asyncio.new_event_loop
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_run(settings))
    except asyncio.CancelledError:
        return 130
    except Exception as exc:
        refusal = refused(exc)
        if refusal is None:
            raise
        log.error("redis_refused", reason=refusal.reason, error=str(refusal))
        sys.stderr.write(f"error: {refusal}\n")
        return EXIT_REFUSED
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
