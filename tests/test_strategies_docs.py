"""docs/strategies.md names every built-in and each of its options; the custom-strategy
example shown in the docs and the README is the module a user loads."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from coordinator.strategies import ALIASES, BUILTINS
from coordinator.strategies.examples import ServerLrFedAvg

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "strategies.md").read_text()


@pytest.mark.parametrize("name", [*BUILTINS, *ALIASES])
def test_every_builtin_and_option_is_documented(name: str) -> None:
    """Each built-in name and constructor option appears in docs/strategies.md."""
    assert f"`{name}`" in DOC
    options = inspect.signature(BUILTINS[ALIASES.get(name, name)].__init__).parameters
    named = [o for o, p in options.items() if p.kind == inspect.Parameter.KEYWORD_ONLY]
    assert sorted(o for o in named if f"`{o}`" not in DOC) == []


@pytest.mark.parametrize("path", ["README.md", "docs/strategies.md"])
def test_the_shown_example_is_the_real_module(path: str) -> None:
    """The class printed in the docs is, line for line, the one --strategy imports."""
    source = inspect.getsource(ServerLrFedAvg)
    assert source in (ROOT / path).read_text()
