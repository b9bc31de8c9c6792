"""The command-line options of per-slot configuration, PBT and merging.

`add_options` adds them; `settings_fields` turns them into `CoordinatorSettings`
fields, checking every slot's configuration before anything starts (a problem
exits with a message naming the slot and the key).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from coordinator.population.config import (
    DEFAULT_BOUNDS,
    MAX_SLOTS,
    Base,
    ConfigError,
    parse_bounds,
    slot_overrides,
)
from coordinator.settings import TrainingSettings

GROUP_DESCRIPTION = f"""\
Slots can differ (a sweep trained in one run on the same clients) and cooperate on
the coordinator's idle time. Keys of --slot-config tables and --sweep: lr, momentum,
weight_decay, proximal_mu, batch_size, epochs, max_steps, local_steps, clients_per_round,
seed, strategy, strategy.OPTION; a key left out takes the command line's value (a slot
that sets epochs or max_steps but not local_steps trains whole epochs). At most
{MAX_SLOTS} slots. PBT explores within [bounds] of the file (default lr in
[{DEFAULT_BOUNDS['lr'][0]:g}, {DEFAULT_BOUNDS['lr'][1]:g}])."""


def add_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--slot-config", type=Path, metavar="FILE",
                   help="TOML file with one [[slot]] table per slot (and optional [bounds] "
                        "for PBT); sets the number of slots (default: all slots alike)")
    g.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="one slot per point of the grid, e.g. --sweep lr=0.01,0.03,0.1 "
                        "(repeatable: several keys make the grid; default: none)")
    g.add_argument("--population", choices=("none", "pbt"), default="none",
                   help="pbt: population-based training; every --pbt-every rounds a slot in "
                        "the bottom --pbt-fraction copies the weights, strategy state and "
                        "hyperparameters of a top slot and perturbs them (default none)")
    g.add_argument("--pbt-every", type=int, default=2, metavar="K",
                   help="rounds of a slot between PBT decisions (default 2)")
    g.add_argument("--pbt-fraction", type=float, default=0.25,
                   help="bottom/top fraction of the slots for PBT, at least one slot "
                        "(default 0.25)")
    g.add_argument("--merge", default="none", metavar="none|final|every=K",
                   help="every=K: every K rounds average the slots' models (weighted by "
                        "examples trained since the last merge) and go on from the average; "
                        "final: at the end keep the best of the plain average, a greedy soup "
                        "and the slots; both need --shared-init (default none)")
    g.add_argument("--shared-init", action="store_true",
                   help="every slot starts from the same initial model (seed --seed), "
                        "as merging needs (default: slot i from seed SEED+i)")


def settings_fields(args: argparse.Namespace, training: TrainingSettings) -> dict[str, Any]:
    """The settings these options give, every slot's configuration checked (SystemExit)."""
    base = Base(training=training, strategy=args.strategy,
                strategy_options=dict(args.strategy_option),
                clients_per_round=args.clients_per_round, seed=args.seed)
    try:
        overrides, bounds = slot_overrides(args.slot_config, args.sweep, base,
                                           getattr(args, "slot_tables", None))
        bounds = parse_bounds(getattr(args, "bounds_table", None) or {}) or bounds
        merge, merge_every = parse_merge(args.merge)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from exc
    slots = _slot_count(args.slots, len(overrides))
    _check_combination(args, merge, slots)
    return {"slots": slots, "slot_overrides": tuple(overrides),
            "explore_bounds": {k: list(v) for k, v in (bounds or DEFAULT_BOUNDS).items()},
            "population": args.population, "pbt_every": args.pbt_every,
            "pbt_fraction": args.pbt_fraction, "merge": merge, "merge_every": merge_every,
            "shared_init": args.shared_init}


def parse_merge(text: str) -> tuple[str, int]:
    if text in ("none", "final"):
        return text, 0
    key, _, value = text.partition("=")
    if key == "every" and value.isdigit() and int(value) > 0:
        return "every", int(value)
    raise ConfigError(f"--merge {text!r}: use none, final or every=K (K > 0)")


def _slot_count(given: int | None, configured: int) -> int:
    if configured and given is not None and given != configured:
        raise SystemExit(f"error: --slots {given} but --slot-config/--sweep define "
                         f"{configured} slots")
    return configured or given or 3


def _check_combination(args: argparse.Namespace, merge: str, slots: int) -> None:
    if merge != "none" and not args.shared_init:
        raise SystemExit("error: --merge needs --shared-init (averaging models from different "
                         "initialisations does not give a good model)")
    if args.population == "pbt" and slots < 2:
        raise SystemExit("error: --population pbt needs at least 2 slots")
    if args.pbt_every < 1 or not 0.0 < args.pbt_fraction <= 0.5:
        raise SystemExit("error: --pbt-every must be >= 1 and --pbt-fraction in (0, 0.5]")
