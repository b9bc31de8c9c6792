"""The long-run health check's verdicts, on made-up samples."""

from __future__ import annotations

from bench.long_run import Sample, redis_verdicts, rss_verdicts

MB = 2**20


def _samples(rss_mb: list[float], keys: list[int], used_mb: list[float]) -> list[Sample]:
    return [Sample(t_s=float(i), rounds=100 + i, rss={"coordinator": int(r * MB)},
                   fds={"coordinator": 20}, redis_keys=k, redis_used=int(u * MB))
            for i, (r, k, u) in enumerate(zip(rss_mb, keys, used_mb, strict=True))]


def test_flat_memory_and_a_trimmed_sawtooth_pass() -> None:
    """Steady RSS passes; Redis going up and down between trims is bounded."""
    saw = [1.3, 1.8, 2.3] * 4
    samples = _samples([550.0] * 12, [22, 25, 28] * 4, saw)
    assert all(v.ok for v in rss_verdicts(samples, 5.0))
    assert all(v.ok for v in redis_verdicts(samples, trim_every_s=3))


def test_a_last_third_without_a_trim_is_not_a_leak() -> None:
    """Trims every 10 s, a sample every second, 17 s measured: the last third (6 s) can
    fall between two trims and hold no trough; the windows widen to 15 s so it does."""
    used = [1.5 + 0.15 * (i % 10) for i in range(2, 20)]  # a trim at 10 s
    samples = _samples([550.0] * len(used), [25] * len(used), used)
    assert min(used[-6:]) > 1.5 * 1.1 + 0.25  # the naive last third looks like a leak
    assert all(v.ok for v in redis_verdicts(samples, trim_every_s=10))


def test_growth_fails() -> None:
    """RSS growing 10% fails the 5% limit; keys and memory whose troughs climb are a leak."""
    samples = _samples([500.0 + 5 * i for i in range(12)], [20 + 5 * i for i in range(12)],
                       [1.0 + 0.5 * i for i in range(12)])
    assert not any(v.ok for v in rss_verdicts(samples, 5.0))
    assert not any(v.ok for v in redis_verdicts(samples, trim_every_s=3))
