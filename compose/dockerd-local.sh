#!/usr/bin/env bash
# Start or stop a private Docker daemon for PWFL's cluster test, where no daemon runs
# (CI machines, containers without systemd). Root only.
#
#   compose/dockerd-local.sh start   # prints the DOCKER_HOST to export; no-op if one answers
#   compose/dockerd-local.sh stop    # stops the daemon this script started (if any)
#   compose/dockerd-local.sh status
#
# The daemon keeps its images in PWFL_DOCKER_DATA (default /var/lib/pwfl-docker), so a
# second run reuses the base image and the build cache. The vfs storage driver works
# everywhere (no overlay mounts inside a container), at the cost of a full copy per layer;
# PWFL_DOCKER_STORAGE=overlay2 is faster where it works. --iptables=false: no NAT rules are
# touched on the host, so containers reach each other on compose's bridge networks but not
# the outside world (builds use --network host instead).
set -euo pipefail

DATA=${PWFL_DOCKER_DATA:-/var/lib/pwfl-docker}
EXEC=${PWFL_DOCKER_EXEC:-/run/pwfl-docker}
SOCK=${PWFL_DOCKER_SOCK:-/run/pwfl-docker.sock}
PIDFILE=${EXEC}.pid
LOG=${DATA}.log
STORAGE=${PWFL_DOCKER_STORAGE:-vfs}
HOST="unix://${SOCK}"

answers() { DOCKER_HOST="$1" timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

ours_running() { [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

start() {
  if ours_running && answers "$HOST"; then echo "DOCKER_HOST=$HOST"; return 0; fi
  if [[ $(id -u) != 0 ]]; then echo "dockerd-local: needs root to start a daemon" >&2; return 77; fi
  command -v dockerd >/dev/null || { echo "dockerd-local: no dockerd (apt-get install docker.io)" >&2; return 77; }
  mkdir -p "$DATA" "$EXEC"
  # setsid: the daemon outlives the shell that started it, and a Ctrl-C there misses it.
  setsid dockerd --storage-driver "$STORAGE" --iptables=false --ip-masq=false \
    --data-root "$DATA" --exec-root "$EXEC" --pidfile "$PIDFILE" -H "$HOST" \
    </dev/null >>"$LOG" 2>&1 &
  for _ in $(seq 1 120); do
    if answers "$HOST"; then echo "DOCKER_HOST=$HOST"; return 0; fi
    sleep 0.5
  done
  echo "dockerd-local: the daemon did not answer within 60 s; its log ($LOG) ends:" >&2
  tail -n 20 "$LOG" >&2
  return 1
}

stop() {
  ours_running || { echo "dockerd-local: not running"; return 0; }
  local pid; pid=$(cat "$PIDFILE")
  kill "$pid"
  for _ in $(seq 1 60); do
    if ! kill -0 "$pid" 2>/dev/null; then
      # dockerd leaves its default network namespace bind-mounted; nothing else holds it.
      if mountpoint -q "$EXEC/netns/default" 2>/dev/null; then umount "$EXEC/netns/default"; fi
      echo "dockerd-local: stopped"
      return 0
    fi
    sleep 0.5
  done
  echo "dockerd-local: pid $pid still running after 30 s" >&2
  return 1
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) if ours_running && answers "$HOST"; then echo "running: DOCKER_HOST=$HOST"; else echo "not running"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
