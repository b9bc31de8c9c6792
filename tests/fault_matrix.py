"""`python -m tests.fault_matrix`: run the fault tests and print the fault matrix.

Runs `tests/test_faults_*.py` (real Redis, agents, trainers and signals; the silo
network test needs root and `ip netns`) with $PWFL_FAULT_MATRIX set, so that each
test's ledger appends its row, then prints the rows as a Markdown table: the fault,
what the logs show the system did about it, the rounds closed of those the run
asked for, the updates folded (gradients averaged, in gradient mode), and the
updates lost and doubled (both must be 0).
Extra arguments go to pytest (for example `-k redis`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.faults import MATRIX_ENV

ROOT = Path(__file__).resolve().parents[1]
FAULT_TESTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_faults_*.py"))
COLUMNS = ("fault", "what happened", "rounds completed", "updates folded", "updates lost",
           "updates doubled")


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = (r["fault"], r["happened"], r["rounds"], r["folded"], r["lost"], r["doubled"])
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        matrix = Path(tmp) / "matrix.jsonl"
        env = os.environ | {MATRIX_ENV: str(matrix)}
        pytest = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
                  *FAULT_TESTS, *argv]
        status = subprocess.run(pytest, cwd=ROOT, env=env, check=False).returncode
        rows = [json.loads(line) for line in matrix.read_text().splitlines()] \
            if matrix.exists() else []
    problems = [p for r in rows for p in r["problems"]]
    sys.stdout.write("\n" + table(rows) + "\n" + "".join(f"problem: {p}\n" for p in problems))
    return status or (1 if problems else 0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
