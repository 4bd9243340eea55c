#!/bin/bash
# The one-command migration demo: builds the release binaries, starts two vfu-i40evf servers (source and
# destination, both with --migration-audit) whose dgram backends talk to the reference VMM over loopback UDP, runs
# vfu-refvmm (docs/refvmm.md) to live-migrate the VF from one to the other under RX and TX traffic, prints the
# timeline and the servers' audit lines, and stops the servers (by PID) on exit.
#
#   scripts/migrate-demo.sh [vfu-refvmm options, e.g. --memory 256M --frames 5000 --rate 10000 --skip-dirty]
#
# Ports: MIGRATE_DEMO_PORT (default: a free base port chosen at random) and the next two. The JSON timeline goes to
# MIGRATE_DEMO_JSON (default target/migrate-demo.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

cargo build --release -q -p server --bin vfu-i40evf -p client-tests --bin vfu-refvmm
SERVER=target/release/vfu-i40evf
VMM=target/release/vfu-refvmm

port_free() { ! { command -v ss >/dev/null && ss -Hlun "( sport = :$1 )" | grep -q .; }; }
if [ -n "${MIGRATE_DEMO_PORT:-}" ]; then
    BASE=$MIGRATE_DEMO_PORT
else
    for _ in $(seq 20); do
        BASE=$((20000 + RANDOM % 40000))
        if port_free "$BASE" && port_free $((BASE + 1)) && port_free $((BASE + 2)); then break; fi
    done
fi
WIRE=127.0.0.1:$BASE
SRC_BACKEND=127.0.0.1:$((BASE + 1))
DST_BACKEND=127.0.0.1:$((BASE + 2))

JSON=${MIGRATE_DEMO_JSON:-target/migrate-demo.json}
DIR=$(mktemp -d /tmp/vfu-migrate-demo.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$DIR"
}
trap cleanup EXIT

start() { # name backend-address
    "$SERVER" --socket "$DIR/$1.sock" --backend "dgram:$2,$WIRE" --migration-audit >"$DIR/$1.log" 2>&1 &
    PIDS+=($!)
}
start source "$SRC_BACKEND"
start destination "$DST_BACKEND"
for s in source destination; do
    for _ in $(seq 100); do [ -S "$DIR/$s.sock" ] && break; sleep 0.05; done
    [ -S "$DIR/$s.sock" ] || { echo "the $s server did not start:"; cat "$DIR/$s.log"; exit 1; }
done
echo "source      $DIR/source.sock       dgram $SRC_BACKEND <-> $WIRE"
echo "destination $DIR/destination.sock  dgram $DST_BACKEND <-> $WIRE"
echo

status=0
"$VMM" --source "$DIR/source.sock" --destination "$DIR/destination.sock" --wire "$WIRE" \
    --source-backend "$SRC_BACKEND" --destination-backend "$DST_BACKEND" --json "$JSON" "$@" || status=$?

echo
echo "server audit (--migration-audit):"
grep -h "migration audit" "$DIR/source.log" "$DIR/destination.log" | sed 's/^/  /' || true
exit $status
