""".ci/floor_constraints.py pins every `>=` floor pyproject declares (make test-min)."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("floor_constraints",
                                                  ROOT / ".ci" / "floor_constraints.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_declared_floor_is_pinned_except_torch() -> None:
    """Each dependency and extra with a `>=` gets `name==floor`; torch and torchvision don't."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = _tool().floors(pyproject)
    assert pins["redis"] == "8.0.1"
    assert pins["msgpack"] == "1.0.5"
    assert "torch" not in pins
    assert "torchvision" not in pins
    declared = pyproject["project"]["dependencies"] + [
        r for extra in pyproject["project"]["optional-dependencies"].values() for r in extra]
    names = {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in declared if ">=" in r}
    assert names - set(pins) == {"torch", "torchvision"}


def test_torchvision_is_an_extra_not_a_dependency() -> None:
    """torchvision is in the vision extra (and dev), not in the core dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(r.startswith("torchvision") for r in project["dependencies"])
    assert project["optional-dependencies"]["vision"] == ["torchvision>=0.16"]
