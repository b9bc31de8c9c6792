#!/usr/bin/env bash
# Download every wheel the image needs into a folder, with this host's pip and its
# configuration (indexes, mirrors, certificates, local wheel folders), so the image
# build itself needs no package index: build with --network host and
#   --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=http://127.0.0.1:PORT/
# while `python3 -m http.server PORT -d DIR` serves the folder (cluster-test.sh does that).
# Also the way to install agents on silo hosts that reach no index (docs/deploy.md).
#
#   compose/wheelhouse.sh DIR [TORCH_SPEC]    # TORCH_SPEC default: "torch torchvision"
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?usage: $0 DIR [TORCH_SPEC]}
TORCH_SPEC=${2:-torch torchvision}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
# The image runs Debian bookworm on x86_64: CPython 3.11, glibc 2.36, so any manylinux
# wheel up to 2.36 fits (pip does not imply the older tags when --platform is given).
platforms=()
for tag in manylinux_2_36 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 \
  manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 \
  manylinux_2_5 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
# pip evaluates environment markers for this host's Python, not the target's: redis-py
# needs async-timeout on Python < 3.11.3, and bookworm's is 3.11.2.
EXTRA=("async-timeout>=4.0.3")
# shellcheck disable=SC2086 # TORCH_SPEC is a list of requirements
"$PY" -m pip download --quiet --only-binary=:all: --python-version 3.11 "${platforms[@]}" \
  --dest "$DIR" $TORCH_SPEC -r <("$PY" compose/requirements.py pyproject.toml) \
  "${EXTRA[@]}"
echo "wheelhouse $DIR: $(ls "$DIR" | wc -l) files, $(du -sh "$DIR" | cut -f1)"
