"""Run files: ``--config run.toml`` takes every option as a key; each run writes its own.

A key is an option's long name without the dashes, ``-`` or ``_`` alike (``local_agents =
2`` for ``--local-agents 2``, ``no_local_handoff = true``); a KEY=VALUE option takes a
table (``task_option = {alpha = 0.5}``) or a list of ``"KEY=VALUE"`` strings, a repeatable
one a list. ``[[slot]]`` tables and a ``[bounds]`` table are what ``--slot-config`` reads.
The file's values become the parser's defaults, so the command line overrides them (a
KEY=VALUE option key by key; ``--sweep`` or ``--slot-config`` replace the file's slots).
An unknown key is an error naming it and the closest valid key.

Every new run writes ``RUN_DIR/run.toml``: every option as resolved (the sweep or the
slot-config file as ``[[slot]]`` tables), so ``python -m coordinator --config
runs/ID/run.toml`` runs it again; its own run.toml is the same file. The run id, --resume
and what only changes the terminal's display are left out.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from coordinator.settings import CoordinatorSettings

FILE_NAME = "run.toml"
TABLES = ("slot", "bounds")
NOT_KEYS = frozenset({"help", "config", "resume"})  # options a run file cannot hold
NOT_WRITTEN = frozenset({"run_id", "slot_config", "sweep", "no_progress", "summary_json",
                         "log_level"})  # a new run's own, or replaced, or display only
REPLACED_BY_CLI = ("--sweep", "--slot-config")
HEADER = "# PWFL run file: python -m coordinator --config run.toml (docs/run-files.md)\n"


class RunFileError(ValueError):
    """A run file cannot be used; the message names the file and the key."""


def add_option(g: argparse._ArgumentGroup) -> None:
    """--config RUN.toml."""
    g.add_argument("--config", type=Path, metavar="RUN.toml",
                   help="a run file: every option below as a TOML key (local_agents = 2, "
                        "task_option = {alpha = 0.5}), [[slot]] and [bounds] tables as "
                        "--slot-config takes; the command line overrides it. Every run "
                        "writes its resolved runs/RUN_ID/run.toml, which --config reruns "
                        "(default: none; docs/run-files.md)")


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Run-file key -> the parser's action, for every long option a file may set."""
    actions = {}
    for action in parser._actions:  # argparse keeps no public list of its actions
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs:
            key = normal_key(longs[0])
            if key not in NOT_KEYS:
                actions[key] = action
    return actions


def normal_key(text: str) -> str:
    """``--local-agents``, ``local-agents`` and ``local_agents`` are one key."""
    return text.lstrip("-").replace("-", "_")


def unknown_key_error(key: str, known: Sequence[str], where: str) -> RunFileError:
    """The error for a key that is no option, naming the closest one."""
    close = difflib.get_close_matches(normal_key(key), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return RunFileError(f"{where}: unknown key {key!r}{hint}")


def read_document(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RunFileError(f"--config {path}: {exc}") from exc


def defaults_of(document: Mapping[str, Any], parser: argparse.ArgumentParser,
                where: str) -> dict[str, Any]:
    """The parser defaults (by dest) a run file's keys give; tables are left to the caller."""
    actions = option_actions(parser)
    defaults: dict[str, Any] = {}
    for key, value in document.items():
        if key in TABLES:
            continue
        action = actions.get(normal_key(key))
        if action is None:
            raise unknown_key_error(key, sorted([*actions, *TABLES]), where)
        try:
            defaults[action.dest] = _converted(action, value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise RunFileError(f"{where}: {key}: {exc}") from None
    return defaults


def _converted(action: argparse.Action, value: Any) -> Any:
    """A TOML value as the command line's parse of the option would give it."""
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return action.const if value else action.default
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        if isinstance(value, Mapping):
            return [(str(k), v) for k, v in value.items()]
        return [_one(action, item) for item in items]
    return _one(action, value)


def _one(action: argparse.Action, value: Any) -> Any:
    if isinstance(value, list | dict):
        raise ValueError(f"expected a single value, got {value!r}")
    parsed = action.type(_text(value)) if callable(action.type) else value
    if action.choices is not None and parsed not in action.choices:
        raise ValueError(f"{parsed!r} is not one of {list(action.choices)}")
    return parsed


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return json.dumps(value)
    return str(value)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line over the run file it names with --config (if any)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return parser.parse_args(argv)
    document = read_document(known.config)
    where = f"--config {known.config}"
    try:
        defaults = defaults_of(document, parser, where)
    except RunFileError as exc:
        parser.error(str(exc))
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if any(str(a).split("=")[0] in REPLACED_BY_CLI for a in argv or []):
        _cli_slots_only(args, defaults)  # the command line's slots replace the file's
    elif "slot" in document:
        args.slot_tables = document["slot"]
    args.bounds_table = document.get("bounds")
    return args


def _cli_slots_only(args: argparse.Namespace, defaults: Mapping[str, Any]) -> None:
    """Keep the command line's --sweep points and --slot-config, not the file's."""
    file_sweep = defaults.get("sweep") or []
    args.sweep = args.sweep[len(file_sweep):]
    if args.slot_config == defaults.get("slot_config"):
        args.slot_config = None


# -- writing -------------------------------------------------------------------------------


def resolved(args: argparse.Namespace, settings: CoordinatorSettings,
             parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The run file of this run: every option as resolved, the slots as tables."""
    document: dict[str, Any] = {}
    for key, action in option_actions(parser).items():
        value: Any = settings.slots if key == "slots" else getattr(args, action.dest, None)
        if key in NOT_WRITTEN or value is None or value == []:
            continue
        if action.nargs == 0:
            document[key] = value == action.const
        elif isinstance(action, argparse._AppendAction) and value and isinstance(value[0], tuple):
            document[key] = dict(value)
        else:
            document[key] = str(value) if isinstance(value, Path) else value
    if settings.slot_overrides:
        document["slot"] = [dict(table) for table in settings.slot_overrides]
    document["bounds"] = {k: list(v) for k, v in settings.explore_bounds.items()}
    return document


def write(run_dir: Path, document: Mapping[str, Any]) -> Path:
    """RUN_DIR/run.toml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / FILE_NAME
    path.write_text(dumps(document))
    return path


def dumps(document: Mapping[str, Any]) -> str:
    """TOML text of plain values: keys, then [bounds]-style tables, then [[slot]] arrays."""
    lines = [HEADER.rstrip("\n")]
    tables = {k: v for k, v in document.items() if isinstance(v, Mapping) and k in TABLES}
    arrays = {k: v for k, v in document.items() if k in TABLES and isinstance(v, list)}
    lines += [f"{_key(k)} = {_value(v)}" for k, v in document.items()
              if k not in tables and k not in arrays]
    for name, table in tables.items():
        lines += ["", f"[{name}]", *(f"{_key(k)} = {_value(v)}" for k, v in table.items())]
    for name, items in arrays.items():
        for item in items:
            lines += ["", f"[[{name}]]", *(f"{_key(k)} = {_value(v)}" for k, v in item.items())]
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(str(k))} = {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return json.dumps(str(value))  # JSON's string escapes are TOML's basic string's


def _float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)
