"""Print a pip constraints file pinning every `>=` floor that pyproject.toml declares.

`make test-min` installs the project against it, so the unit tests run with the
oldest releases we claim to support (like `uv --resolution lowest-direct`: our own
dependencies at their floors, what they pull in at its newest). Left out: torch and
torchvision (pinned by the Makefile's TORCH_PIN: other releases are gigabytes to
download) and the build requirements.

    python3 .ci/floor_constraints.py [pyproject.toml]
"""

import re
import sys
import tomllib

SKIP = {"torch", "torchvision", "pwfl"}
FLOOR = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def floors(pyproject: dict) -> dict[str, str]:
    """Package name -> the version after `>=`, for dependencies and every extra."""
    project = pyproject["project"]
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    found = {}
    for requirement in declared:
        match = FLOOR.match(requirement)
        if match and match.group(1).lower() not in SKIP:
            found[match.group(1).lower()] = match.group(3)
    return found


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"
    with open(path, "rb") as f:
        pins = floors(tomllib.load(f))
    sys.stdout.write("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
