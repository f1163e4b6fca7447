#!/usr/bin/env bash
# (The paths are those of the session that ran it: a copy of ../shared/bench in /work/bench-sio/bench, the release build in /work/tgt-sio.)
# Switchboard's Socket.IO endpoint beside Node Socket.IO (the shared harness's
# socketio_node peer), scenarios a b c e, in one run; Switchboard's /ws beside
# them (a, c) for the cost of the Socket.IO framing; then fan-out to 1,000
# subscribers over wss:// beside ws:// (`switchboard bench fanout`).
# Loopback only; every process is stopped by its PID.
set -uo pipefail
H=/work/bench-sio/bench
OUT=/work/bench-sio/out
PKI=/work/bench-sio/pki
BIN=/work/tgt-sio/release/switchboard
KEY=bench-admin-key-0123456789abcdef
JSONL=$OUT/socketio.jsonl
mkdir -p "$OUT"
SBENV="env SWITCHBOARD_AUTH__ADMIN_KEY=$KEY SWITCHBOARD_LIMITS__MAX_CONNECTIONS=20000 RUST_LOG=warn"
SBUP="$BIN up --gateway-listen 127.0.0.1:9000 --eventbus-listen 127.0.0.1:9051 --agent-bridge-listen 127.0.0.1:9052"
date -u +%Y-%m-%dT%H:%M:%SZ >"$OUT/started"; uptime >>"$OUT/started"
for round in 1; do
  "$H/run.sh" --no-build --out "$JSONL" --runs 1 --peers "socketio_node" --scenarios "a b c e"
  LOADGEN_AUTH=$KEY "$H/run.sh" --no-build --out "$JSONL" --runs 1 --name switchboard-socketio --proto socketio \
    --target ws://127.0.0.1:9000 --scenarios "a b c e" \
    --server-cmd "sh -c 'rm -rf $OUT/data && exec $SBENV $SBUP --data-dir $OUT/data'"
  LOADGEN_AUTH=$KEY "$H/run.sh" --no-build --out "$JSONL" --runs 1 --name switchboard-ws \
    --target ws://127.0.0.1:9000/ws/connect --scenarios "a" \
    --server-cmd "sh -c 'rm -rf $OUT/data && exec $SBENV $SBUP --data-dir $OUT/data'"
done
date -u +%Y-%m-%dT%H:%M:%SZ >"$OUT/finished"

# Fan-out to 1,000 subscribers over wss:// beside ws://, interleaved, the same
# `switchboard up` (memory backend) on CPU 0 and `switchboard bench fanout` on CPU 1.
fanout() {
  local scheme=$1 tlsenv="" ca=""
  if [ "$scheme" = wss ]; then
    tlsenv="SWITCHBOARD_GATEWAY__TLS_CERT=$PKI/server.crt SWITCHBOARD_GATEWAY__TLS_KEY=$PKI/server.key"
    ca="--ca $PKI/ca.pem"
  fi
  rm -rf "$OUT/data"
  env $tlsenv SWITCHBOARD_AUTH__ADMIN_KEY=$KEY RUST_LOG=warn taskset -c 0 $SBUP --backend memory --data-dir "$OUT/data" \
    >"$OUT/up-$scheme.out" 2>"$OUT/up-$scheme.err" &
  local pid=$!
  for _ in $(seq 300); do (echo >/dev/tcp/127.0.0.1/9000) 2>/dev/null && break; sleep 0.1; done
  sleep 1
  timeout 60 taskset -c 1 "$BIN" bench fanout --ws "$scheme://127.0.0.1:9000/ws/connect" $ca --url http://127.0.0.1:9051 \
    --key "$KEY" --clients 1000 --rate "${RATE:-400}" --size 256 --duration 10s --server-pid "$pid" --json \
    | jq -c --arg s "$scheme" '. + {scheme: $s}' >>"$OUT/tls.jsonl"
  kill "$pid"; wait "$pid" 2>/dev/null
  sleep 1
}
fanout ws; fanout wss
date -u +%Y-%m-%dT%H:%M:%SZ >>"$OUT/finished"
