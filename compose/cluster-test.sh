#!/usr/bin/env bash
# The compose cluster, tested for real: build the image as compose/README.md says for a
# machine without a registry (tagged pwfl:latest, the compose file's default), then from a
# fresh checkout with nothing written first (no compose/.env, no PWFL_* variable, no
# password in the environment) run the README's commands unchanged, on the default job
# (3 slots, 6 clients, 5 rounds of Fashion-MNIST):
#   docker compose -f compose/docker-compose.yml up -d
#   docker compose -f compose/docker-compose.yml logs -f coordinator
#   curl -s http://127.0.0.1:8765/status
#   docker compose -f compose/docker-compose.yml down -v
# It `docker kill`s one agent mid-run and waits until the coordinator reports its clients
# lost (heartbeat expiry) while the run goes on; it reads the coordinator's final table
# from its log, checks that every slot finished its rounds and that the Redis password was
# generated into the secrets volume, then tears everything down.
#
#   compose/cluster-test.sh            # exit 0 pass, 1 fail, 77 cannot run here (says why)
#
# Where no Docker daemon answers, one is started (compose/dockerd-local.sh, root only) and
# stopped at the end. Where no base image can be pulled, one is debootstrapped
# (compose/base-image.sh). The image is built offline from a wheelhouse that this host's
# pip fills (compose/wheelhouse.sh), so the build needs no package index of its own.
#
# Settings (environment):
#   PWFL_TEST_OUT        folder for results, logs and events (default: a new temp folder)
#   PWFL_TEST_RUN_TIMEOUT  seconds the default job may take once the cluster is up
#                        (default 2400: 30 jobs of 80 CNN steps on a busy 2-core machine)
#   PWFL_TORCH_SPEC      torch for the image (default torch==2.13.0, the CPU build where
#                        this host's pip has it; elsewhere e.g. "torch torchvision" with
#                        PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)
#   PWFL_BASE            base image (default: python:3.11-slim-bookworm if present or
#                        pullable, else pwfl-bookworm-base, debootstrapped)
#   PWFL_IMAGE           image tag built (default pwfl:latest, the tag the compose file
#                        uses when PWFL_IMAGE is unset in its environment: the cluster
#                        itself runs with no PWFL_* variable)
#   PWFL_TEST_KEEP_IMAGE 0 removes the image at the end (default 1: later runs reuse layers)
#
# Runs on one machine take turns (a lock in /run/lock): they share the private daemon,
# which the run that started it stops at its end, and the wheelhouse port.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
COMPOSE_FILE=$ROOT/compose/docker-compose.yml  # replaced by the fresh checkout's

OUT=${PWFL_TEST_OUT:-$(mktemp -d /tmp/pwfl-cluster-test.XXXXXX)}
mkdir -p "$OUT"
RUN_TIMEOUT=${PWFL_TEST_RUN_TIMEOUT:-2400}
TORCH_SPEC=${PWFL_TORCH_SPEC:-torch==2.13.0}
IMAGE=${PWFL_IMAGE:-pwfl:latest}
WHEELS=${PWFL_WHEELHOUSE:-/var/tmp/pwfl-wheels}
PROJECT=compose  # compose's default: the compose file's folder (no -p, as in the README)
HTTP_PORT=8765   # the README's published port: 127.0.0.1:8765
KILLED=agent-b
KILLED_CLIENTS=2,3  # agent-b's, in compose/docker-compose.yml

STARTED_DAEMON=0
WHEEL_SERVER=
LOGS_PID=
COMPOSE=()
T0=$(date +%s.%N)
declare -A TIMES

since() { awk -v start="$1" -v now="$(date +%s.%N)" 'BEGIN { printf "%.1f", now - start }'; }
log() { printf '[cluster-test %6ss] %s\n' "$(since "$T0")" "$*"; }
skip() { echo "SKIP: $*" | tee "$OUT/skip.txt" >&2; exit 77; }
fail() { echo "FAIL: $*" | tee "$OUT/fail.txt" >&2; exit 1; }
timed() {  # timed NAME CMD...: run CMD, remember its wall time under NAME
  local name=$1 start; shift
  start=$(date +%s.%N)
  "$@"
  TIMES[$name]=$(since "$start")
}
pyjson() { python3 -c "import json, sys; d = json.load(sys.stdin); $1"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- 1. a Docker daemon ------------------------------------------------------------------

ensure_daemon() {
  command -v docker >/dev/null || skip "no docker client (apt-get install docker.io)"
  if timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
    log "using the Docker daemon at ${DOCKER_HOST:-the default socket}"
    return
  fi
  local line rc=0
  # 9>&-: the daemon outlives this script and must not hold its turn (lock) open.
  line=$(compose/dockerd-local.sh start 2>"$OUT/dockerd-start.err" 9>&-) || rc=$?
  if [[ $rc == 77 ]]; then skip "no Docker daemon answers and none can be started: $(cat "$OUT/dockerd-start.err")"; fi
  [[ $rc == 0 ]] || fail "starting dockerd: $(cat "$OUT/dockerd-start.err")"
  export "${line?}"
  STARTED_DAEMON=1
  log "started a private Docker daemon ($line)"
}

# vfs keeps a full copy per layer and per container: about 14 GB at the peak.
check_disk() {
  local root free_gb need_gb=${PWFL_TEST_MIN_FREE_GB:-15}
  root=$(docker info --format '{{.DockerRootDir}}' 2>/dev/null) || return 0
  free_gb=$(df --output=avail -B1G "$root" 2>/dev/null | tail -n 1 | tr -d ' ') || return 0
  if [[ -n $free_gb ]] && ((free_gb < need_gb)); then
    skip "only ${free_gb} GB free under $root; the cluster test needs about ${need_gb} GB"
  fi
}

# --- 2. the image ------------------------------------------------------------------------

pick_base() {
  if [[ -n ${PWFL_BASE:-} ]]; then echo "$PWFL_BASE"; return; fi
  local official=python:3.11-slim-bookworm
  if docker image inspect "$official" >/dev/null 2>&1 \
      || timeout 120 docker pull -q "$official" >/dev/null 2>&1; then
    echo "$official"; return
  fi
  local rc=0
  timeout 900 compose/base-image.sh pwfl-bookworm-base >&2 || rc=$?
  [[ $rc == 77 ]] && skip "no base image can be pulled or debootstrapped"
  [[ $rc == 0 ]] || fail "debootstrapping the base image"
  echo pwfl-bookworm-base
}

# BuildKit when this client has it (buildx, or a client older than 23 with it built in):
# the classic builder runs a container per step, which vfs makes slow.
docker_build() {
  local client
  local limit=${PWFL_BUILD_TIMEOUT:-1200}
  if docker buildx version >/dev/null 2>&1; then
    DOCKER_BUILDKIT=1 timeout "$limit" docker build "$@"; return
  fi
  for client in $(type -ap docker); do
    if [[ $("$client" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1) -lt 23 ]]; then
      DOCKER_BUILDKIT=1 timeout "$limit" "$client" build "$@"; return
    fi
  done
  log "no BuildKit here: the classic builder is much slower under vfs"
  DOCKER_BUILDKIT=0 timeout "$limit" docker build "$@"
}

serve_wheels() {
  compose/wheelhouse.sh "$WHEELS" "$TORCH_SPEC" >"$OUT/wheelhouse.log" 2>&1 \
    || fail "filling the wheelhouse: $(grep -v 'neither a file' "$OUT/wheelhouse.log" | tail -5)"
  # A fixed port: the URL is a build argument, and a new value would miss the layer cache.
  WHEEL_PORT=${PWFL_WHEEL_PORT:-38741}
  if ! python3 -c "import socket; socket.socket().bind(('127.0.0.1', $WHEEL_PORT))" 2>/dev/null; then
    WHEEL_PORT=$(free_port)
    log "port ${PWFL_WHEEL_PORT:-38741} is taken: serving wheels on $WHEEL_PORT (no layer cache)"
  fi
  python3 -m http.server "$WHEEL_PORT" --bind 127.0.0.1 --directory "$WHEELS" \
    >"$OUT/wheel-server.log" 2>&1 9>&- &
  WHEEL_SERVER=$!
  for _ in $(seq 50); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$WHEEL_PORT/', timeout=1)" \
      2>/dev/null && return
    sleep 0.1
  done
  fail "the wheelhouse server did not answer"
}

build_image() {
  local base=$1
  docker_build --network host -f compose/Dockerfile -t "$IMAGE" \
    --build-arg BASE="$base" --build-arg TORCH_SPEC="$TORCH_SPEC" \
    --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS="http://127.0.0.1:$WHEEL_PORT/" \
    . >"$OUT/build.log" 2>&1 || fail "docker build (see $OUT/build.log): $(tail -5 "$OUT/build.log")"
}

# --- 3. the cluster ----------------------------------------------------------------------

pick_compose() {
  if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
  elif command -v docker-compose >/dev/null; then COMPOSE=(docker-compose)
  else skip "neither docker compose nor docker-compose is installed"; fi
  COMPOSE+=(-f compose/docker-compose.yml)  # run from the fresh checkout's root
}

compose() { (cd "$CHECKOUT" && "${COMPOSE[@]}" "$@"); }
# The README's commands, run as written (and listed in commands.txt for the test to
# compare with the README).
readme() { echo "${COMPOSE[*]} $*" >>"$OUT/commands.txt"; compose "$@"; }

# What `git clone` of this tree would hold: tracked files and new ones git does not
# ignore, as they are now (uncommitted edits included), and nothing else: no compose/.env.
fresh_checkout() {
  local fresh=$OUT/checkout
  command -v git >/dev/null && git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 \
    || fail "the fresh-checkout run needs git and a git checkout at $ROOT"
  rm -rf "$fresh"
  mkdir -p "$fresh"
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | tar -C "$ROOT" --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$fresh" -xf -
  [[ -f $fresh/compose/docker-compose.yml ]] || fail "copying the checkout to $fresh"
  [[ ! -e $fresh/compose/.env ]] || fail "$fresh/compose/.env exists: git should ignore it"
  COMPOSE_FILE=$fresh/compose/docker-compose.yml
  CHECKOUT=$fresh
  log "fresh checkout in $fresh (no compose/.env)"
}

# Nothing sizes or names the run: no PWFL_* variable reaches compose, as on a fresh
# machine. Only the Docker client's own settings (DOCKER_HOST for a private daemon) stay.
cluster_env() {
  local name
  for name in $(compgen -e | grep '^PWFL_' || true); do unset "$name"; done
  # docker-compose 1.x gives up on a daemon call after 60 s; removing a container under
  # vfs on a busy machine can take longer.
  export COMPOSE_HTTP_TIMEOUT=${COMPOSE_HTTP_TIMEOUT:-300}
  if ! python3 -c "import socket; socket.socket().bind(('127.0.0.1', $HTTP_PORT))" 2>/dev/null; then
    skip "127.0.0.1:$HTTP_PORT, the port the README's cluster publishes, is taken on this host"
  fi
}

# The README's first two commands: `up -d`, then `logs -f coordinator`, which follows the
# coordinator's log to its final table and returns when the coordinator exits.
compose_up() {
  if [[ -n $(project_container coordinator) ]]; then  # an earlier run that was not torn down
    log "removing the containers and volumes an earlier run of project $PROJECT left"
    compose down -v >>"$OUT/down.log" 2>&1 || fail "compose down -v of the leftovers"
  fi
  readme up -d >"$OUT/up.log" 2>&1 9>&- || fail "compose up -d: $(tail -5 "$OUT/up.log")"
  readme logs -f coordinator >"$OUT/coordinator.log" 2>&1 9>&- &
  LOGS_PID=$!
  local deadline=$((SECONDS + 600))
  until status_json >/dev/null; do
    ((SECONDS < deadline)) || fail "the coordinator did not answer within 600 s of up"
    sleep 0.5
  done
}

stop_logs() {
  [[ -n $LOGS_PID ]] || return 0
  for _ in $(seq 120); do kill -0 "$LOGS_PID" 2>/dev/null || break; sleep 0.5; done
  kill "$LOGS_PID" 2>/dev/null || true  # gone already once the coordinator has exited
  wait "$LOGS_PID" 2>/dev/null || true
  LOGS_PID=
}

project_container() {  # the id of SERVICE's container, running or not (v1 and v2 alike)
  docker ps -a -q --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1" | head -n 1
}

# The generated password: the secrets step exited 0, the file is 0600 and pwfl's, and no
# long-running container has the password in its environment.
check_secret() {
  local id others=0 svc
  SECRETS_EXIT=$(docker inspect -f '{{.State.ExitCode}}' "$(project_container secrets)")
  SECRET_FILE=$(docker run --rm --network none --entrypoint stat \
    -v "${PROJECT}_secrets:/s:ro" "$IMAGE" -c '%a %U %s' /s/redis-password 2>&1 || true)
  for svc in redis coordinator agent-a agent-b agent-c; do
    id=$(project_container "$svc")
    if docker inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$id" \
        | grep -q '^PWFL_REDIS_PASSWORD='; then others=$((others + 1)); fi
  done
  PASSWORD_IN_ENV=$others
}

status_json() {  # the README's `curl -s http://127.0.0.1:8765/status`
  if [[ ! -e $OUT/.curl-listed ]]; then
    echo "curl -s http://127.0.0.1:$HTTP_PORT/status" >>"$OUT/commands.txt"
    touch "$OUT/.curl-listed"
  fi
  if command -v curl >/dev/null; then
    curl -sf --max-time 2 "http://127.0.0.1:$HTTP_PORT/status"
  else
    python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$HTTP_PORT/status', timeout=2).read().decode())" 2>/dev/null
  fi
}

# Wait until every client has registered and some slot has closed a round, so the kill
# lands in the middle of the run.
wait_mid_run() {
  local deadline=$((SECONDS + RUN_TIMEOUT)) status
  while ((SECONDS < deadline)); do
    status=$(status_json) || { sleep 0.5; continue; }
    if echo "$status" | pyjson "
alive = [c for c in d['clients'] if c.get('alive')]
done = [s['rounds_done'] for s in d['slots']]
sys.exit(0 if len(alive) >= 6 and 1 <= max(done) <= d['slots'][0]['rounds'] - 3 else 1)"
    then echo "$status" >"$OUT/status-before-kill.json"; return; fi
    sleep 0.3
  done
  fail "the run did not get going within $RUN_TIMEOUT s (see $OUT/compose.log)"
}

# The killed agent's clients must be reported lost while the run still goes on: the
# coordinator notices once their heartbeats expire (5 s), long before the default job's
# remaining rounds end. A run that ends first makes the check meaningless: it fails here.
wait_lost() {
  local deadline=$((SECONDS + 120)) status
  while ((SECONDS < deadline)); do
    status=$(status_json) || fail "the coordinator stopped answering before $KILLED's clients were reported lost"
    if echo "$status" | pyjson "
killed = set('$KILLED_CLIENTS'.split(','))
gone = {c['client_id'] for c in d['clients'] if not c.get('alive')}
sys.exit(0 if killed <= gone and any(s['state'] != 'done' for s in d['slots']) else 1)"
    then echo "$status" >"$OUT/status-after-loss.json"; log "$KILLED's clients reported lost, run still going"; return; fi
    sleep 0.5
  done
  fail "$KILLED's clients were not reported lost within 120 s of the kill"
}

kill_agent() {
  local id
  id=$(compose ps -q "$KILLED")
  docker kill "$id" >/dev/null
  KILLED_ID=$id
  log "killed $KILLED ($id) mid-run: $(pyjson "print([s['rounds_done'] for s in d['slots']], 'rounds done')" <"$OUT/status-before-kill.json")"
}

wait_coordinator() {
  local id code
  id=$(compose ps -q coordinator)
  code=$(timeout "$RUN_TIMEOUT" docker wait "$id") \
    || fail "the coordinator did not exit within $RUN_TIMEOUT s"
  COORDINATOR_EXIT=$code
  stop_logs  # `logs -f` returns once the coordinator has exited
}

collect() {
  compose ps >"$OUT/ps.txt" 2>&1 || true
  compose logs --no-color >"$OUT/compose.log" 2>&1 || true
  local id
  id=$(project_container coordinator)
  [[ -n $id ]] || return 0
  docker logs "$id" >"$OUT/coordinator-docker.log" 2>&1 || true
  # The README's way out of the runs volume.
  docker cp "$id:/data/runs" "$OUT/runs" >/dev/null 2>&1 || true
  local newest
  newest=$(ls -t "$OUT"/runs/*/events.jsonl 2>/dev/null | head -n 1) || true
  [[ -z $newest ]] || cp "$newest" "$OUT/events.jsonl"
}

teardown() {
  local rc=$?
  set +e
  if ((${#COMPOSE[@]})); then
    collect
    # The README's last command (`timeout` runs programs, not the `readme` function).
    echo "${COMPOSE[*]} down -v" >>"$OUT/commands.txt"
    pushd "$CHECKOUT" >/dev/null
    timed down timeout 600 "${COMPOSE[@]}" down -v >>"$OUT/down.log" 2>&1
    popd >/dev/null
    stop_logs
  fi
  [[ -n $WHEEL_SERVER ]] && kill "$WHEEL_SERVER" 2>/dev/null
  tidy_images >/dev/null 2>&1
  if [[ $STARTED_DAEMON == 1 ]]; then "$ROOT/compose/dockerd-local.sh" stop >/dev/null; fi
  write_times
  log "done (exit $rc); results in $OUT"
  exit "$rc"
}

# Under vfs every build leaves GBs behind: drop earlier builds of this tag and the build
# cache this run did not use, so that repeated runs do not fill the disk.
tidy_images() {
  if [[ ${PWFL_TEST_KEEP_IMAGE:-1} == 0 ]]; then
    docker rmi "$IMAGE"
    docker builder prune -af
  fi
  docker image prune -f
  docker builder prune -f --filter until=30m
}

write_times() {
  local args=()
  for k in "${!TIMES[@]}"; do args+=("$k=${TIMES[$k]}"); done
  python3 - "$OUT/timings.json" "${args[@]}" <<'EOF'
import json, sys
pairs = dict(a.split("=", 1) for a in sys.argv[2:])
json.dump({k: round(float(v), 1) for k, v in sorted(pairs.items())}, open(sys.argv[1], "w"), indent=1)
EOF
}

# --- 4. the verdict ----------------------------------------------------------------------

verdict() {
  local restarts
  restarts=$(docker inspect -f '{{.RestartCount}}' "$KILLED_ID" 2>/dev/null || echo "?")
  python3 - "$OUT" "$COORDINATOR_EXIT" "$KILLED" "$restarts" \
    "$(docker image inspect -f '{{.Size}}' "$IMAGE")" "$REDIS_NOAUTH" "$SECRETS_EXIT" \
    "$SECRET_FILE" "$PASSWORD_IN_ENV" "$COMPOSE_FILE" <<'EOF'
import json, pathlib, re, sys
(out, exit_code, killed, restarts, image_bytes, noauth, secrets_exit, secret_file,
 in_env, compose_file) = sys.argv[1:]
out = pathlib.Path(out)
BAR = "\u2502"


def final_table(log):
    """The coordinator's closing table ("PWFL run STATE", a row per slot): its state, its
    lines and its rows, from the last such table in the log."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", log).splitlines()
    titles = [i for i, line in enumerate(lines) if re.match(r"\s*PWFL run \w+\s*$", line)]
    if not titles:
        return None, [], []
    table = lines[titles[-1]:titles[-1] + 40]
    rows = []
    for line in table:
        cells = [c.strip() for c in line.strip().strip(BAR).split(BAR)]
        if len(cells) == 7 and cells[0].isdigit() and "/" in cells[1]:
            done, rounds = (int(x) for x in cells[1].split("/"))
            accuracy = None if cells[4] == "-" else float(cells[4].rstrip("%")) / 100
            rows.append({"slot_id": int(cells[0]), "rounds_done": done, "rounds": rounds,
                         "state": cells[2], "last_accuracy": accuracy})
    # Up to its caption; "wall time ..." may come before it in the merged log: it goes to
    # stderr and the table to stdout.
    end = next((i for i, line in enumerate(table) if line.startswith("clients alive:")), 30)
    return table[0].split()[-1], table[:end + 1], rows


log = (out / "coordinator-docker.log").read_text(errors="replace")
state, table, slots = final_table(log)
events_path = out / "events.jsonl"
events = ([json.loads(line) for line in events_path.read_text().splitlines()]
          if events_path.exists() else [])
lost = sorted({e["client_id"] for e in events if e.get("event") == "client_lost"})
started = next((e for e in events if e.get("event") == "run_started"), {})
result = {
    "coordinator_exit": int(exit_code), "status": state, "final_table": table,
    "slots": slots, "task": started.get("task"), "rounds": started.get("rounds"),
    "wall_time": next((line for line in log.splitlines() if line.startswith("wall time")),
                      None),
    "killed": killed, "killed_restarts": restarts, "clients_lost": lost,
    "image_bytes": int(image_bytes), "redis_ping_without_password": noauth.strip(),
    "compose_file": compose_file,
    "env_file_present": (pathlib.Path(compose_file).parent / ".env").exists(),
    "secrets_exit": int(secrets_exit), "secret_file": secret_file.strip(),
    "password_in_environment_of": int(in_env),
    "commands": (out / "commands.txt").read_text().splitlines(),
    "up_log_tail": re.sub(r"\x1b\[[0-9;]*m", "", (out / "up.log").read_text(
        errors="replace")).splitlines()[-12:],
}
(out / "result.json").write_text(json.dumps(result, indent=1))
print("\n".join(table))
print(json.dumps({k: v for k, v in result.items() if k != "final_table"}))
ok = (result["coordinator_exit"] == 0 and result["status"] == "finished" and slots
      and all(s["rounds_done"] == s["rounds"] for s in slots)
      and result["secrets_exit"] == 0 and result["secret_file"].startswith("600 pwfl ")
      and result["password_in_environment_of"] == 0 and not result["env_file_present"])
sys.exit(0 if ok else 1)
EOF
}

take_turn() {
  local lock=${PWFL_TEST_LOCK:-/run/lock/pwfl-cluster-test.lock}
  exec 9>>"$lock" || skip "cannot open the lock file $lock"
  if ! flock -n 9; then
    log "another cluster test is running; waiting for it (up to 20 min)"
    flock -w 1200 9 || fail "another cluster test held $lock for 20 min"
  fi
}

main() {
  command -v python3 >/dev/null || skip "python3 is needed to read the coordinator's JSON"
  take_turn
  trap teardown EXIT
  timed daemon ensure_daemon
  check_disk
  fresh_checkout
  pick_compose
  local base base_start run_start
  base_start=$(date +%s.%N)
  base=$(pick_base)
  TIMES[base]=$(since "$base_start")
  log "base image $base"
  timed wheelhouse serve_wheels
  timed build build_image "$base"
  log "built $IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | numfmt --to=iec)"
  cluster_env
  timed up compose_up
  log "cluster up (project $PROJECT, status on 127.0.0.1:$HTTP_PORT)"
  # Redis must refuse a client without the password.
  REDIS_NOAUTH=$(docker exec "$(project_container redis)" redis-cli ping 2>&1 || true)
  run_start=$(date +%s.%N)
  wait_mid_run
  kill_agent
  wait_lost
  wait_coordinator
  TIMES[run]=$(since "$run_start")
  log "coordinator exited with $COORDINATOR_EXIT"
  collect
  check_secret
  verdict || fail "not every slot finished its rounds, or the password was not generated as it should (see $OUT/result.json)"
  log "PASS: from a fresh checkout with no .env, the README's commands ran the default job to its final table with $KILLED killed mid-run"
}

main "$@"
