#!/usr/bin/env bash
# (The paths are those of the session that ran it.)
# Idle memory again (scenario c) after the input channel went: Node Socket.IO and Switchboard's Socket.IO, one run.
set -uo pipefail
H=/work/bench-sio/bench; OUT=/work/bench-sio/out2; BIN=/work/tgt-sio/release/switchboard; KEY=bench-admin-key-0123456789abcdef
JSONL=$OUT/socketio-c.jsonl; mkdir -p "$OUT"
SBENV="env SWITCHBOARD_AUTH__ADMIN_KEY=$KEY SWITCHBOARD_LIMITS__MAX_CONNECTIONS=20000 RUST_LOG=warn"
SBUP="$BIN up --gateway-listen 127.0.0.1:9000 --eventbus-listen 127.0.0.1:9051 --agent-bridge-listen 127.0.0.1:9052"
date -u +%Y-%m-%dT%H:%M:%SZ >"$OUT/started"; uptime >>"$OUT/started"
"$H/run.sh" --no-build --out "$JSONL" --runs 1 --peers "socketio_node" --scenarios "c"
LOADGEN_AUTH=$KEY "$H/run.sh" --no-build --out "$JSONL" --runs 1 --name switchboard-socketio --proto socketio \
  --target ws://127.0.0.1:9000 --scenarios "c a" \
  --server-cmd "sh -c 'rm -rf $OUT/data && exec $SBENV $SBUP --data-dir $OUT/data'"
date -u +%Y-%m-%dT%H:%M:%SZ >"$OUT/finished"
