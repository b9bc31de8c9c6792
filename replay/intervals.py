"""Interval arithmetic on `(start, end)` pairs of seconds: union, length, clipping.

Busy time is a union, never a sum: concurrent slots make the coordinator's
intervals overlap, and a client's leases may overlap when something went wrong.
"""

from __future__ import annotations

from collections.abc import Iterable

Span = tuple[float, float]


def union(spans: Iterable[Span]) -> list[Span]:
    """Disjoint, sorted spans covering exactly the given ones (empty spans dropped)."""
    merged: list[Span] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(spans: Iterable[Span]) -> float:
    """Total time covered by the spans, overlaps counted once."""
    return sum(end - start for start, end in union(spans))


def intersect(spans: Iterable[Span], window: Iterable[Span]) -> list[Span]:
    """The parts of `spans` that fall inside `window`."""
    out: list[Span] = []
    window_union = union(window)
    for start, end in union(spans):
        for w_start, w_end in window_union:
            lo, hi = max(start, w_start), min(end, w_end)
            if hi > lo:
                out.append((lo, hi))
    return out


def clip(spans: Iterable[Span], start: float, end: float) -> list[Span]:
    """The parts of `spans` between `start` and `end`."""
    return intersect(spans, [(start, end)])


def fraction(part: float, whole: float) -> float:
    """`part / whole`, 0 when there is no whole."""
    return part / whole if whole > 0 else 0.0
