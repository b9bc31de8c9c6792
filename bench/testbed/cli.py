"""`python -m bench.testbed`: bring emulated silos up, run a command on them, clean up."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from bench.testbed import netns
from bench.testbed.bed import POLL_S, Testbed, wait
from bench.testbed.profiles import PROFILES, STEP_S, Profile

ENV = "PWFL_TESTBED"  # `run` sets it: the path of the bed's description (JSON)

DESCRIPTION = """\
An emulated cross-silo testbed on this machine (needs root). Each silo is a network
namespace joined to the host by a veth pair; the kernel shapes both directions (tbf;
this kernel has no netem) and a delaying TCP relay on the host adds the profile's
round trip to every connection a silo makes to a service on the host (Redis,
Flower's SuperLink). Devices are EMULATED: each training call is padded with sleep to
steps x nominal step time x the silo's slowdown (client_agent --emulate-device), and
every report counts the calls whose real compute overran that time.

Everything it makes is named pwtb<owner pid>... and removed when the command ends,
however it ends; after a SIGKILL, the next start or `down` removes the leftovers.
"""

EPILOG = "profiles:\n" + "\n".join(
    f"  {p.name:12} {p.summary}" for p in PROFILES.values()) + f"""

nominal step times at speed 1 (seconds): {', '.join(f'{k} {v:g}' for k, v in STEP_S.items())}

examples:
  python -m bench.testbed up wan                  # until Ctrl-C; prints the silos
  python -m bench.testbed run hetero -- ip netns list
  python -m bench.testbed measure slow-wan        # what the relay adds, as JSON
  python -m bench.testbed status                  # silos up now, bytes and drops
  python -m bench.testbed down                    # remove what dead testbeds left
  python -m bench.payoff --testbed hetero         # the benchmarks use it as a library
"""


def describe(bed: Testbed) -> dict[str, Any]:
    """The bed as JSON: its profile, and per silo its namespace, addresses and device."""
    p = bed.profile
    return {"profile": p.name, "rate_mbit": p.rate_mbit, "rtt_ms": p.rtt_ms,
            "emulation": "devices are emulated: training padded to nominal step times",
            "step_s": STEP_S, "silos": [
                {"index": s.index, "netns": s.link.netns, "host_address": s.link.host_address,
                 "silo_address": s.link.silo_address, "slowdown": s.slowdown,
                 "clients": list(s.clients),
                 "emulate_device_cnn": s.emulate_device(STEP_S["cnn"])} for s in bed.silos]}


def _profile(name: str) -> Profile:
    if name not in PROFILES:
        raise argparse.ArgumentTypeError(f"unknown profile {name!r}; known: "
                                         f"{', '.join(PROFILES)}")
    return PROFILES[name]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.testbed", description=DESCRIPTION,
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser("up", help="bring the profile's silos up and hold them until Ctrl-C "
                                   "or SIGTERM, then remove them")
    run = sub.add_parser("run", help="bring the silos up, run CMD on the host with "
                                     f"${ENV} naming the bed's JSON description, remove them; "
                                     "exits with CMD's status")
    for cmd in (up, run):
        cmd.add_argument("profile", type=_profile, metavar="PROFILE",
                         help=f"one of {', '.join(PROFILES)}")
        cmd.add_argument("--silos", type=int, help="only the first N silos of the profile "
                                                   "(default: all, 6)")
    run.add_argument("cmd", nargs="*", metavar="-- CMD", help="the command and its arguments, "
                                                             "after --")
    down = sub.add_parser("down", help="remove every namespace, link and process that "
                                       "testbeds whose owner died left behind")
    down.add_argument("--all", action="store_true",
                      help="also remove the silos of testbeds still running (their owners "
                           "lose their links)")
    sub.add_parser("status", help="the silos up now: owner, addresses, and per link the bytes "
                                  "each way and the qdiscs' counters (tc -s)")
    measure = sub.add_parser("measure", help="what the delaying relay adds: round trip and "
                                             "upload rate from a silo, direct and relayed, "
                                             "as one JSON line")
    measure.add_argument("profile", type=_profile, metavar="PROFILE")
    return p


def cmd_up(args: argparse.Namespace) -> int:
    with Testbed(args.profile, silos=args.silos) as bed:
        print(json.dumps(describe(bed), indent=1))
        print(f"testbed up ({len(bed.silos)} silos): {args.profile.describe()}; Ctrl-C or SIGTERM "
              "removes it", flush=True)
        while True:  # until a signal unwinds the bed; pause() could sleep through one
            time.sleep(POLL_S)  # that arrived just before it


def cmd_run(args: argparse.Namespace) -> int:
    argv = args.cmd
    if not argv:
        raise SystemExit("run: give the command after --")
    with Testbed(args.profile, silos=args.silos) as bed, \
            tempfile.NamedTemporaryFile("w", suffix=".json", prefix="testbed-") as desc:
        json.dump(describe(bed), desc)
        desc.flush()
        print(f"testbed up ({len(bed.silos)} silos): {args.profile.describe()}", file=sys.stderr,
              flush=True)
        return wait(bed.popen(None, argv, env={ENV: desc.name}))


def cmd_down(args: argparse.Namespace) -> int:
    gone = netns.remove_leftovers(include_live=args.all)
    print(f"removed {len(gone)} silo(s): {', '.join(s.netns for s in gone) or 'none'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    silos = netns.owned()
    if not silos:
        print("no testbed silos")
    for silo in silos:
        print(f"{silo.netns}: owner pid {silo.owner_pid}, host {silo.host_address} <-> silo "
              f"{silo.silo_address}: {json.dumps(netns.link_counters(silo))}")
        print(netns.qdisc_text(silo))
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from bench.testbed.measure import measure

    print(json.dumps(measure(args.profile)))
    return 0


COMMANDS = {"up": cmd_up, "run": cmd_run, "down": cmd_down, "status": cmd_status,
            "measure": cmd_measure}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:cut])
    if args.command == "run":
        args.cmd = [*args.cmd, *argv[cut + 1:]]
    if os.geteuid() != 0 and args.command != "status":
        print("bench.testbed needs root (network namespaces, veth pairs, tc); run it as root, "
              "e.g. with sudo. Nothing was changed.", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args)
    except netns.TestbedError as exc:
        print(f"bench.testbed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
