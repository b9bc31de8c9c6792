"""Smoke test of the serialization benchmark (figures are not checked, only their form)."""

from __future__ import annotations

import json
import subprocess
import sys

HEADLINE = [
    "encode_gbps", "decode_gbps", "memcpy_gbps", "encode_vs_memcpy", "decode_vs_memcpy",
    "finite_check_gbps", "blob_put_vs_raw", "blob_get_vs_raw",
]


def test_quick_bench_ends_with_one_json_line_of_headline_figures() -> None:
    """`python -m bench.serialization --quick` prints a table, then JSON with every headline key."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.serialization", "--quick"],
        capture_output=True, text=True, timeout=90, check=True,
    )
    lines = done.stdout.strip().splitlines()
    assert any("encode_into" in line for line in lines)  # the table came first
    figures = json.loads(lines[-1])
    for key in HEADLINE:
        assert figures[key] > 0, key
        assert figures[f"cnn_{key}"] > 0, key
