"""Fuzzing in CI: random, mutated and edited inputs raise nothing but PayloadError
(the trainer pipe protocol's too).

The same fuzzers run with ``python -m tests.fuzz --cases 100000`` for the big count.
"""

from __future__ import annotations

import pytest

from tests.fuzz import FUZZERS, main, run_batch

# ~2,400 cases in all: the fast fuzzers get more of them.
CASES = {
    "decode_random": 500,
    "decode_mutated": 400,
    "decode_headers": 500,
    "message_random": 500,
    "message_mutated": 250,
    "message_maps": 250,
    "protocol_random": 300,
    "protocol_mutated": 250,
    "protocol_maps": 250,
}


def test_every_fuzzer_has_a_ci_budget() -> None:
    """Each fuzzer of tests.fuzz runs in CI."""
    assert set(CASES) == set(FUZZERS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fuzzer_raises_nothing_but_payload_error(name: str) -> None:
    """Every generated input is accepted or rejected with the decoder's one error type."""
    assert run_batch(name, CASES[name]) >= CASES[name] // 2


def test_the_fuzz_runner_counts_cases(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m tests.fuzz` prints the cases run and zero crashes, and exits 0."""
    assert main(["--cases", "30", "--jobs", "1", "--only", "message_random"]) == 0
    out = capsys.readouterr().out
    assert "message_random" in out
    assert "30 cases   0 crashes" in out
