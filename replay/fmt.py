"""Number formatting shared by the terminal tables and the HTML report."""

from __future__ import annotations

_SPARKS = "▁▂▃▄▅▆▇█"


def seconds(value: float | None) -> str:
    """A duration a person reads at a glance: ms below a second, m:ss above two minutes."""
    if value is None:
        return "-"
    if abs(value) < 1.0:
        return f"{value * 1000:.0f}ms" if value else "0"
    if abs(value) < 120.0:
        return f"{value:.1f}s"
    minutes, secs = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(round(value / 60), 60)
    return f"{hours}h{minutes:02d}m"


def task(name: object) -> str:
    """A task's short name: "trainer_worker.tasks.synthetic:SyntheticTask" -> "synthetic"."""
    return str(name).split(":")[0].rsplit(".", 1)[-1]


def span(low: float, high: float) -> str:
    """A range of durations, the unit said once when it can be: "53.9-55.2s"."""
    if high < 120.0 and low >= 1.0:
        return f"{low:.1f}-{high:.1f}s"
    return f"{seconds(low)}-{seconds(high)}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def nbytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def ratio(value: float | str | None, base: float | str | None) -> str:
    """`value / base` as "x1.23", or "-" when either side is missing, text or zero."""
    if not isinstance(value, float | int) or not isinstance(base, float | int) or base == 0:
        return "-"
    return f"x{value / base:.2f}"


def sparkline(values: list[float], lo: float | None = None, hi: float | None = None,
              width: int = 30) -> str:
    """Unicode bars, one per value (evenly thinned to `width`), scaled between `lo` and `hi`."""
    if not values:
        return ""
    if len(values) > width:
        values = [values[round(i * (len(values) - 1) / (width - 1))] for i in range(width)]
    low = min(values) if lo is None else lo
    high = max(values) if hi is None else hi
    span = high - low
    if span <= 0:
        return _SPARKS[-1] * len(values)
    steps = len(_SPARKS) - 1
    return "".join(_SPARKS[round((min(max(v, low), high) - low) / span * steps)] for v in values)


def cell(value: float | str | None, kind: str) -> str:
    """A table cell by kind: "s" seconds, "pct", "acc", "bytes", else a whole number;
    text as it is."""
    if value is None or isinstance(value, str):
        return "-" if value is None else value
    if kind == "s":
        return seconds(value)
    if kind == "pct":
        return percent(value)
    if kind == "acc":
        return accuracy(value)
    if kind == "bytes":
        return nbytes(value)
    return f"{value:.0f}"
