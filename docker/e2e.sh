#!/usr/bin/env bash
# The Docker deployment built and run for real on this machine, then torn down:
#
#   engine    the Docker engine and compose, installed from the distribution if missing; a
#             daemon started (DOCKERD_FLAGS) if none answers
#   base      an image with Python 3.11: BASE_IMAGE if set, else python:3.11-slim if a registry
#             answers, else one made from Debian packages (debootstrap, docker import)
#   wheels    the wheelhouse (WHEELHOUSE, default docker/wheelhouse), filled if it is empty
#   build     the superlink, supernode and base images, from the wheelhouse alone
#   secrets   a CA and the SuperLink's certificate (names superlink, localhost), three node keys
#   up        compose.yml: SuperLink (TLS, node authentication, state database), the register
#             step (node-0 and node-1), two SuperNodes
#   round     the app submitted from this machine (`flwr run`) for one short round on the
#             embedded SmolLM2 and the mounted data; its results.json must show the round
#   refusal   a SuperNode with node-2's key, never registered, must be refused
#   down      containers, network and volumes removed (KEEP=1 leaves them for a look)
#
# Each step's time and the images' sizes are printed; any failure exits non-zero.
#   bash docker/e2e.sh
# Needs the project's .venv (made by scripts/install.sh if missing) for the certificates and
# the `flwr` CLI, and root where the engine must be installed or started.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${MOPS_E2E_DIR:-$(mktemp -d /tmp/mops-docker-e2e.XXXXXX)}
mkdir -p "$WORK"
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-mops-e2e}
export WHEELHOUSE=${WHEELHOUSE:-docker/wheelhouse}
export MOPS_SECRETS=$WORK/secrets
export MOPS_DATA=${MOPS_DATA:-$(cd "$ROOT/.." && pwd)/shared/data}
export FLWR_HOME=$WORK/flwr
# Creating a container copies the whole image under the vfs storage driver: minutes, not seconds.
export COMPOSE_HTTP_TIMEOUT=${COMPOSE_HTTP_TIMEOUT:-900} DOCKER_CLIENT_TIMEOUT=${DOCKER_CLIENT_TIMEOUT:-900}
LOCAL_BASE=local/debian-python:bookworm
DOCKERD_FLAGS=${DOCKERD_FLAGS:---iptables=false --bridge=none --storage-driver=vfs}
RUN_CONFIG=${RUN_CONFIG:-"num-server-rounds=1 min-available-nodes=2 fraction-train=1.0 fraction-evaluate=1.0 samples=200 max-length=128 local-steps=3 input-prompt-steps=2 gate-pretrain-steps=10 gate-pretrain-samples=32 eval-samples=8 generation-samples=0 out-dir='/cache/e2e-run'"}
DAEMON_PID=""
STEP=""
T0=$SECONDS

say() { printf '[e2e %5ds] %s\n' $((SECONDS - T0)) "$*"; }
step() {  # step NAME FUNCTION: runs it, prints its time
    STEP=$1
    local start=$SECONDS
    say "$1 ..."
    "$2"
    say "$1 done in $((SECONDS - start)) s"
}
compose() { "${COMPOSE[@]}" -f docker/compose.yml "$@"; }
apt_install() {
    [ "$(id -u)" = 0 ] || { echo "missing $*; install it (apt-get install $*) or run as root" >&2; return 1; }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

teardown() {
    local code=$?
    [ $code = 0 ] || say "FAILED in step '$STEP' (exit $code); logs in $WORK"
    if [ -n "${COMPOSE+x}" ] && [ "${KEEP:-0}" != 1 ] && docker info >/dev/null 2>&1; then
        compose logs --no-color > "$WORK/compose.log" 2>&1 || true
        compose --profile setup down -v --remove-orphans >/dev/null 2>&1 || true
        say "down: containers, network and volumes of $COMPOSE_PROJECT_NAME removed"
    fi
    if [ -n "$DAEMON_PID" ] && [ "${KEEP:-0}" != 1 ]; then
        kill "$DAEMON_PID" 2>/dev/null; wait "$DAEMON_PID" 2>/dev/null || true
        say "down: the daemon this script started is stopped"
    fi
    exit $code
}
trap teardown EXIT

engine() {
    command -v dockerd >/dev/null && command -v docker >/dev/null || apt_install docker.io
    if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
    else command -v docker-compose >/dev/null || apt_install docker-compose; COMPOSE=(docker-compose); fi
    if ! docker info >/dev/null 2>&1; then
        say "no daemon answers: dockerd $DOCKERD_FLAGS"
        # shellcheck disable=SC2086
        dockerd $DOCKERD_FLAGS > "$WORK/dockerd.log" 2>&1 &
        DAEMON_PID=$!
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
        docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log" >&2; return 1; }
    fi
    say "engine $(docker version --format '{{.Server.Version}}'), compose: ${COMPOSE[*]}"
}

debian_mirror() {  # the mirror apt uses here (or DEBIAN_MIRROR), for debootstrap
    local uri
    uri=$(grep -hoE '^(URIs:|deb) +[a-z]+://[^ ]+' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
          | grep -v security | head -1 | awk '{print $2}')
    uri=${DEBIAN_MIRROR:-$uri}
    if [ -z "$uri" ]; then
        echo "error: apt names no Debian mirror here (/etc/apt/sources.list*) to build a base image from: set DEBIAN_MIRROR," \
             "or BASE_IMAGE to an image with Python 3.11 and its venv module" >&2
        return 1
    fi
    echo "$uri"
}

base_image() {
    if [ -n "${BASE_IMAGE:-}" ]; then say "base image given: $BASE_IMAGE"
    elif timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1; then BASE_IMAGE=python:3.11-slim
    elif docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then BASE_IMAGE=$LOCAL_BASE; say "no registry; $LOCAL_BASE is here already"
    else
        local mirror
        mirror=$(debian_mirror) || exit 1
        say "no registry; building $LOCAL_BASE from Debian packages ($mirror)"
        command -v debootstrap >/dev/null || apt_install debootstrap
        debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
            bookworm "$WORK/rootfs" "$mirror" > "$WORK/debootstrap.log" 2>&1
        tar -C "$WORK/rootfs" -c . | docker import - "$LOCAL_BASE" >/dev/null
        rm -rf "$WORK/rootfs"
        BASE_IMAGE=$LOCAL_BASE
    fi
    export BASE_IMAGE
    docker run --rm --network none "$BASE_IMAGE" python3 -c 'import sys, venv; assert sys.version_info[:2] == (3, 11), sys.version'
}

venv() {
    [ -x .venv/bin/flwr ] || bash scripts/install.sh
}

wheels() {
    if ls "$WHEELHOUSE"/*.whl >/dev/null 2>&1; then say "wheelhouse $WHEELHOUSE: $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels already"
    else .venv/bin/python -m deploy wheelhouse --out "$WHEELHOUSE"; fi
}

build() {
    compose --profile setup build superlink supernode-0 register
}

secrets() {
    .venv/bin/python -m deploy certs --out "$MOPS_SECRETS" --host superlink --host localhost --host 127.0.0.1
    .venv/bin/python -m deploy keys --out "$MOPS_SECRETS" --nodes 3  # node-2 is never registered
    # The containers run as uid 1000 and read the secrets as bind-mounted files.
    chown -R 1000 "$MOPS_SECRETS" 2>/dev/null || chmod -R a+rX "$MOPS_SECRETS"
    mkdir -p "$FLWR_HOME"
    printf '[superlink]\ndefault = "docker"\n\n[superlink.docker]\naddress = "127.0.0.1:9093"\nroot-certificates = "%s"\n' \
        "$MOPS_SECRETS/ca.crt" > "$FLWR_HOME/config.toml"
}

online() {  # how many SuperNodes the SuperLink counts online
    .venv/bin/flwr supernode ls docker --format json 2>/dev/null \
        | .venv/bin/python -c 'import json, sys; print(sum(n["status"] == "online" for n in json.load(sys.stdin)["nodes"]))' 2>/dev/null || echo 0
}

up() {
    compose up -d superlink
    for _ in $(seq 60); do .venv/bin/flwr ls docker >/dev/null 2>&1 && break; sleep 1; done
    .venv/bin/flwr ls docker >/dev/null || { compose logs superlink | tail -20 >&2; return 1; }
    compose --profile setup run --rm register
    compose up -d supernode-0 supernode-1
    for _ in $(seq 120); do [ "$(online)" = 2 ] && break; sleep 1; done
    [ "$(online)" = 2 ] || { compose logs supernode-0 supernode-1 | tail -30 >&2; return 1; }
    say "2 SuperNodes online"
}

round() {
    # `flwr run` exits 0 even when the ServerApp fails: the round is checked in its results.
    timeout 1800 .venv/bin/flwr run . docker --stream --run-config "$RUN_CONFIG" > "$WORK/run.log" 2>&1 || true
    sed 's/\x1b\[[0-9;]*m//g; s/^INFO *: *//' "$WORK/run.log" | grep -E "^round +[01] \|" | sed 's/^/    /' || true
    compose exec -T superlink cat /cache/e2e-run/results.json > "$WORK/results.json" \
        || { tail -40 "$WORK/run.log" >&2; return 1; }
    .venv/bin/python - "$WORK/results.json" <<'EOF'
import json, sys
rounds = json.load(open(sys.argv[1]))["rounds"]
assert [r["round"] for r in rounds] == [0, 1], rounds
assert rounds[1]["accepted"] == 2 and rounds[1]["failed"] == 0, rounds[1]
print(f"    round 1: {rounds[1]['accepted']} clients accepted, perplexity {rounds[0]['perplexity']:.3f} -> {rounds[1]['perplexity']:.3f}")
EOF
}

refusal() {
    local out code=0
    out=$(timeout 300 "${COMPOSE[@]}" -f docker/compose.yml run --rm --no-deps -v "$MOPS_SECRETS/node-2:/run/secrets/node-2:ro" \
          supernode-0 --superlink=superlink:9093 --root-certificates=/run/secrets/ca.crt \
          --auth-supernode-private-key=/run/secrets/node-2 --max-retries=1 2>&1) || code=$?
    echo "$out" > "$WORK/refused.log"
    [ $code != 0 ] || { echo "an unregistered SuperNode was not refused (exit 0)" >&2; return 1; }
    grep -m1 "Failed to activate SuperNode" <<<"$out" | sed "s/^/    exit $code: /" \
        || { echo "no refusal in its log:" >&2; tail -20 <<<"$out" >&2; return 1; }
}

sizes() {
    docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "^(mops-fl/|$BASE_IMAGE )" | sed 's/^/    /'
    du -sh "$WHEELHOUSE" | sed 's/^/    wheelhouse /'
}

step engine engine
step venv venv
step base base_image
step wheels wheels
step build build
step secrets secrets
step up up
step round round
step refusal refusal
step sizes sizes
say "all steps passed"
