#!/usr/bin/env bash
# Make a Debian bookworm base image without a registry: debootstrap a minimal root
# filesystem and `docker import` it. For hosts that cannot pull debian:bookworm or
# python:3.11-slim-bookworm; build with `--build-arg BASE=pwfl-bookworm-base` then.
#
#   compose/base-image.sh [NAME]     # default NAME pwfl-bookworm-base; no-op if it exists
#
# Needs root, debootstrap and a Debian mirror: DEBIAN_MIRROR, else the first `URIs:` /
# `deb` line of apt's own sources, else http://deb.debian.org/debian.
set -euo pipefail

NAME=${1:-pwfl-bookworm-base}
if docker image inspect "$NAME" >/dev/null 2>&1; then echo "base image $NAME exists"; exit 0; fi
command -v debootstrap >/dev/null || { echo "base-image: apt-get install debootstrap" >&2; exit 77; }
[[ $(id -u) == 0 ]] || { echo "base-image: debootstrap needs root" >&2; exit 77; }

mirror() {
  if [[ -n ${DEBIAN_MIRROR:-} ]]; then echo "$DEBIAN_MIRROR"; return; fi
  local found
  found=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | awk '/^URIs:.*debian\/?$/ {print $2; exit} /^deb .*debian\/? bookworm/ {print $2; exit}')
  echo "${found:-http://deb.debian.org/debian}"
}

ROOTFS=$(mktemp -d /var/tmp/pwfl-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
MIRROR=$(mirror)
echo "debootstrap bookworm from $MIRROR"
debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
  || { tail -n 20 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
chmod 0755 "$ROOTFS"  # mktemp made it 0700, and it becomes the image's /
tar -C "$ROOTFS" -c . | docker import --change 'CMD ["bash"]' - "$NAME" >/dev/null
echo "base image $NAME: $(docker image inspect -f '{{.Size}}' "$NAME" | numfmt --to=iec)"
