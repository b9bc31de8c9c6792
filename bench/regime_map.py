"""`python -m bench.regime_map`: where several slots pay off, one figure and one table.

Reads what the testbed benchmarks left in RUNS (default `runs/`), per profile:

- `payoff-PROFILE/results.json` (`bench.payoff --testbed PROFILE`): the best 3-slot
  mode's time to the target accuracy (`--target`, 85% by default) over the best one-slot
  baseline's (synchronous or asynchronous);
- `payoff-PROFILE-resnet18/results.json` (`... --model resnet18`): the best 3-slot
  mode's client jobs per minute over the best baseline's, shown inverted (time per
  job) so that, like the others, below 1 means the slots win;
- `vs-flower-PROFILE.log` (`bench.vs_flower --testbed PROFILE | tee ...`, its last
  line): PWFL's best time to the target (any payoff mode, or PWFL's default job in the
  vs_flower run) over Flower's deployment engine's (Flower's default-like job).

Missing files leave gaps ("-", "not measured"); where 3-slot runs exist and none of
their modes reached the target on every seed, the slots' ratio is "3 slots never"
(likewise "1 slot never" for the baselines, "both never"). The
figure is a PNG (profiles on the x axis, one bar per ratio, the issue's goals 0.7
and 0.3 drawn), the table Markdown; both say that devices were emulated.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.payoff import BASELINES
from bench.testbed.profiles import PROFILES

GOAL_SLOTS = 0.7
GOAL_FLOWER = 0.3
TARGETS = ("0.8", "0.85")


@dataclass(frozen=True)
class Regime:
    """One profile's ratios at one target accuracy (None: not measured, or never reached:
    `never` says which side missed the target, for the slots' ratio)."""

    profile: str
    slots_vs_one: float | None  # best 3-slot time to target / best one-slot baseline's
    best_slots: str | None
    best_one: str | None
    resnet_slots_vs_one: float | None  # best baseline's jobs/min / best 3-slot mode's
    pwfl_vs_flower: float | None  # PWFL's best time to target / Flower deployment's
    flower_s: float | None  # Flower deployment's time to target
    pwfl_s: float | None  # PWFL's best time to target
    # Runs exist and no mode of that side reached the target on every seed: "3 slots",
    # "1 slot", "both"; "" when the slots' ratio is there or was not measured.
    never: str = ""
    target: str = "0.85"


def _rows(path: Path) -> dict[str, dict[str, Any]] | None:
    return json.loads(path.read_text())["rows"] if path.exists() else None


def _time_to(row: dict[str, Any], key: str) -> float | None:
    stat = row[key]
    return None if stat["missing"] or stat["mean"] is None else float(stat["mean"])


def _best(rows: dict[str, dict[str, Any]], modes: Sequence[str], key: str,
          smaller: bool) -> tuple[str | None, float | None]:
    """The mode among `modes` with the best mean of `key` (time: smaller), and that mean;
    a time some seed never reached does not count."""
    found = [(m, _time_to(rows[m], key) if key.startswith("time_to_") else rows[m][key]["mean"])
             for m in modes if m in rows]
    found = [(m, v) for m, v in found if v is not None]
    if not found:
        return None, None
    return min(found, key=lambda mv: mv[1] if smaller else -mv[1])


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _flower(log: Path, target: str = "0.85") -> tuple[float | None, float | None]:
    """(Flower deployment's, PWFL default job's) mean time to `target` from a vs_flower
    log."""
    if not log.exists():
        return None, None
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
    if not lines:
        return None, None
    last = json.loads(lines[-1])
    key = f"time_to_{_percent(target)}_s"
    return (last.get(f"flower-deployment:flower-default-like:{key}"),
            last.get(f"pwfl:pwfl-default-job:{key}"))


def regime(runs: Path, profile: str, target: str = "0.85") -> Regime:
    """The ratios of `profile` at `target` accuracy from the files under `runs`."""
    key = f"time_to_{target}"
    cnn = _rows(runs / f"payoff-{profile}" / "results.json") or {}
    resnet = _rows(runs / f"payoff-{profile}-resnet18" / "results.json") or {}
    slots = [m for m in cnn if m not in BASELINES]
    best_one, t_one = _best(cnn, BASELINES, key, smaller=True)
    best_slots, t_slots = _best(cnn, slots, key, smaller=True)
    _, j_one = _best(resnet, BASELINES, "jobs_per_min", smaller=False)
    _, j_slots = _best(resnet, [m for m in resnet if m not in BASELINES], "jobs_per_min",
                       smaller=False)
    flower, pwfl_default = _flower(runs / f"vs-flower-{profile}.log", target)
    pwfl = min((t for t in (t_one, t_slots, pwfl_default) if t is not None), default=None)
    missed = (bool(slots) and t_slots is None, any(m in cnn for m in BASELINES) and t_one is None)
    never = {(True, True): "both", (True, False): "3 slots", (False, True): "1 slot"}.get(
        missed, "")
    return Regime(profile, _ratio(t_slots, t_one), best_slots, best_one,
                  _ratio(j_one, j_slots), _ratio(pwfl, flower), flower, pwfl, never=never,
                  target=target)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(target: str) -> int:
    """"0.85" -> 85: how vs_flower names its targets, and how the map labels them."""
    return round(float(target) * 100)


def table(regimes: list[Regime]) -> str:
    """The Markdown table of the map ("3 slots never": 3-slot runs were made and none of
    their modes reached the target on every seed, likewise "1 slot never" and "both never";
    "-": not measured)."""
    t = f"{_percent(regimes[0].target) if regimes else 85}%"
    lines = [f"| profile | best 3-slot / best 1-slot, time to {t} | modes | ResNet-18-sized: "
             f"3-slot / 1-slot time per job | PWFL best / Flower deployment, time to {t} | "
             f"PWFL s to {t} | Flower s to {t} |", "|---|---|---|---|---|---|---|"]
    for r in regimes:
        modes = f"{r.best_slots or '-'} vs {r.best_one or '-'}"
        slots = f"{r.never} never" if r.never else _fmt(r.slots_vs_one)
        lines.append(f"| {r.profile} | {slots} | {modes} | "
                     f"{_fmt(r.resnet_slots_vs_one)} | {_fmt(r.pwfl_vs_flower)} | "
                     f"{_fmt(r.pwfl_s, 0)} | {_fmt(r.flower_s, 0)} |")
    lines.append("\nBelow 1: the first system or mode is faster. Devices EMULATED (training "
                 f"padded to nominal step times); goals {GOAL_SLOTS} (slots) and "
                 f"{GOAL_FLOWER} (Flower).")
    return "\n".join(lines)


def figure(regimes: list[Regime], title: str) -> bytes:
    """Grouped bars per profile: the three ratios, goals as dashed lines; PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    t = f"{_percent(regimes[0].target) if regimes else 85}%"
    series = ((f"3 slots / 1 slot, time to {t} (CNN)", "slots_vs_one", "#4C72B0"),
              ("3 slots / 1 slot, time per job (ResNet-18-sized)", "resnet_slots_vs_one",
               "#55A868"),
              (f"PWFL / Flower deployment, time to {t}", "pwfl_vs_flower", "#DD8452"))
    fig = Figure(figsize=(1.6 + 1.5 * len(regimes), 4.2))
    ax = fig.add_subplot()
    width = 0.26
    for i, (_, attr, colour) in enumerate(series):
        for x, r in enumerate(regimes):
            value = getattr(r, attr)
            pos = x + (i - 1) * width
            if value is None:
                never = r.never if attr == "slots_vs_one" else ""
                ax.text(pos, 0.02, f"{'abc'[i]}: {f'{never} never' if never else 'not measured'}",
                        ha="center", va="bottom", fontsize=7, rotation=90)
            else:
                ax.bar(pos, value, width, color=colour)
                ax.text(pos, value, f"{value:.2f}", ha="center", va="bottom", fontsize=7)
    # The goals are named in the legend, in their series' colour (a label on the plot ran
    # into the rotated "not measured" texts).
    lines = [ax.axhline(GOAL_SLOTS, color=series[0][2], linestyle="--", linewidth=1.0,
                        label=f"goal for a: {GOAL_SLOTS}"),
             ax.axhline(GOAL_FLOWER, color=series[2][2], linestyle="--", linewidth=1.0,
                        label=f"goal for c: {GOAL_FLOWER}"),
             ax.axhline(1.0, color="#2b2b2b", linewidth=0.8, label="1.0: break-even")]
    values = [v for r in regimes for _, a, _ in series if (v := getattr(r, a)) is not None]
    ax.set_ylim(0, max([1.2, *(1.15 * v for v in values)]))
    ax.set_xlim(-0.5, len(regimes) - 0.5)
    ax.set_xticks(range(len(regimes)), [r.profile for r in regimes])
    ax.set_ylabel("ratio (below 1: slots / PWFL faster)")
    ax.set_title(title, fontsize=10)
    ax.legend(handles=[*(Patch(color=colour, label=f"{'abc'[i]}: {label}")
                         for i, (label, _, colour) in enumerate(series)), *lines],
              fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False,
              ncols=2)
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.regime_map", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("runs"),
                   help="where the testbed benchmarks wrote (default runs/)")
    p.add_argument("--profiles", default=",".join(PROFILES),
                   help=f"profiles on the x axis, in order (default {','.join(PROFILES)})")
    p.add_argument("--out", type=Path, default=None,
                   help="figure and table go to OUT.png and OUT.md (default RUNS/regime-map)")
    p.add_argument("--target", choices=TARGETS, default="0.85",
                   help="the accuracy whose time the ratios compare (default 0.85; 0.8 shows "
                        "where slots got at all when they never reached 85%%)")
    p.add_argument("--title", default=None,
                   help="the figure's title (default: 'Where several slots pay off, time to "
                        "TARGET (devices EMULATED)'; say 'SMOKE RUN' for one)")
    args = p.parse_args(argv)
    args.title = args.title or (f"Where several slots pay off, time to {_percent(args.target)}% "
                                "(devices EMULATED)")
    out = args.out or args.runs / "regime-map"
    regimes = [regime(args.runs, name, args.target) for name in args.profiles.split(",")]
    text = table(regimes)
    # OUT.md and OUT.png next to OUT (not with_suffix: "map-0.8" would lose its ".8")
    md, png = (out.with_name(f"{out.name}.{ext}") for ext in ("md", "png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(f"# {args.title}\n\n{text}\n")
    png.write_bytes(figure(regimes, args.title))
    print(text)
    print(f"figure: {png}, table: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
