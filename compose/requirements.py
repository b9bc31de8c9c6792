"""Print the project's requirements from pyproject.toml, one per line, without torch.

torch and torchvision are installed first, in a layer of their own and from an
index that picks their build (CPU or CUDA), so the image build and the offline
wheelhouse install everything else from this list: project dependencies plus
build requirements (the project itself is installed with --no-build-isolation).

    python3 compose/requirements.py [pyproject.toml]
"""

import re
import sys
import tomllib

SEPARATE = {"torch", "torchvision"}


def requirements(pyproject: dict) -> list[str]:
    wanted = pyproject["project"]["dependencies"] + pyproject["build-system"]["requires"]
    return [r for r in wanted if re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0].lower()
            not in SEPARATE]


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"
    with open(path, "rb") as f:
        sys.stdout.write("".join(f"{r}\n" for r in requirements(tomllib.load(f))))
