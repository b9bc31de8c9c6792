"""`--report DIR`: a self-contained HTML page and PNG figures."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from replay.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "replay"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium"
                                        if os.path.exists("/usr/bin/chromium") else None)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("report")
    argv = [str(FIXTURES / "synth_1slot.jsonl"), str(FIXTURES / "synth_3slot.jsonl"),
            "--report", str(directory), "--simulate", "slots=1,3", "--json"]
    assert main(argv) == 0
    return directory


def test_report_writes_the_page_and_every_figure(report_dir: Path) -> None:
    """report.html plus timeline, accuracy and idle PNGs per run, comparison and what-if."""
    names = sorted(p.name for p in report_dir.iterdir())
    assert "report.html" in names
    for suffix in ("timeline", "accuracy", "idle", "whatif"):
        assert f"1-synth_1slot-{suffix}.png" in names
        assert f"2-synth_3slot-{suffix}.png" in names
    assert "comparison-accuracy.png" in names
    for png in report_dir.glob("*.png"):
        assert png.read_bytes().startswith(PNG_MAGIC)


def test_report_is_self_contained(report_dir: Path) -> None:
    """Every image is inline base64; nothing is fetched from anywhere."""
    page = (report_dir / "report.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) == 9
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(href|src)="(https?:)?//', page)
    assert "<link" not in page
    assert "<script" not in page


def test_report_shows_the_numbers(report_dir: Path) -> None:
    """The page carries the headline numbers, tables and the what-if error."""
    page = (report_dir / "report.html").read_text()
    for text in ("Side by side", "slot-rounds / hour", "Coordinator", "Clients",
                 "Traffic and integrity", "prediction error", "lease violations"):
        assert text in page


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium")
def test_report_renders_in_headless_chromium(report_dir: Path) -> None:
    """Chromium renders the page to a screenshot (checked by eye during development)."""
    assert CHROMIUM is not None
    shot = report_dir / "screenshot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             f"--screenshot={shot}", "--window-size=1400,2400",
             (report_dir / "report.html").as_uri()],
            capture_output=True, timeout=60, check=False,
        )
    assert shot.read_bytes().startswith(PNG_MAGIC)
    assert shot.stat().st_size > 50_000  # a page with figures, not a blank one
