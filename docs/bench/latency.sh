#!/bin/bash
# Issue 16, item 1: publish-to-screen latency beside the bare Rust server, in one run.
# Server on CPU 0, load on CPU 1; the shared harness's loadgen and rust_bare built in $H
# (cp -r ../shared/bench $H; cargo build --release in $H/loadgen and $H/peers/rust_bare with CARGO_TARGET_DIR=$H/target).
# Usage: docs/bench/latency.sh OUT.jsonl [ROUNDS]   (SB = the switchboard binary, default target/release/switchboard)
set -u
out=${1:?out.jsonl}; rounds=${2:-1}
H=${H:-/tmp/h}; SB=${SB:-target/release/switchboard}; LG=$H/target/release/loadgen
KEY=bench-admin-key-0123456789
e="--conns 1000 --msgs 1000 --rate 100 --inflight 4 --payload 256"
one="--conns 1 --msgs 500 --rate 100 --inflight 1 --payload 256"
# Scenario e at a fifth of the rate: the same 1,000 subscribers with the server core ~20% busy, so the
# path's own cost shows without the queueing that ~95% busy adds to scenario e.
e20="--conns 1000 --msgs 200 --rate 20 --inflight 4 --payload 256"
run_load() { # label pid port
  for s in e e20 one; do
    LOADGEN_AUTH=$KEY taskset -c 1 timeout 90 $LG --target ws://127.0.0.1:$3/ws/connect ${!s} --server-pid $2 --deadline 60 --label $1/$s >> $out 2>/dev/null
  done
}
wait_port() { for i in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.1; done; }
for round in $(seq 1 $rounds); do
  PORT=18104 WORKERS=1 taskset -c 0 $H/target/release/rust_bare 2>/dev/null & pid=$!
  wait_port 18104; sleep 0.5; run_load rust_bare $pid 18104; kill $pid; wait $pid 2>/dev/null
  for backend in memory embedded; do
    d=$(mktemp -d)
    SWITCHBOARD_AUTH__ADMIN_KEY=$KEY SWITCHBOARD_EVENTBUS__FSYNC=always taskset -c 0 $SB up --backend $backend --data-dir $d \
      --gateway-listen 127.0.0.1:18400 --eventbus-listen 127.0.0.1:18451 --agent-bridge-listen 127.0.0.1:18452 > $d/out 2>$d/err & pid=$!
    wait_port 18400; sleep 0.5; run_load sb-$backend $pid 18400; kill $pid; wait $pid 2>/dev/null; rm -rf $d
    # One subscriber, published over gRPC straight to the bus.
    d=$(mktemp -d)
    SWITCHBOARD_AUTH__ADMIN_KEY=$KEY SWITCHBOARD_EVENTBUS__FSYNC=always taskset -c 0 $SB up --backend $backend --data-dir $d \
      --gateway-listen 127.0.0.1:18400 --eventbus-listen 127.0.0.1:18451 --agent-bridge-listen 127.0.0.1:18452 > $d/out 2>$d/err & pid=$!
    wait_port 18400; sleep 0.5
    echo "{\"label\":\"sb-$backend/bench-fanout-1\",\"out\":$(SWITCHBOARD_AUTH__ADMIN_KEY=$KEY taskset -c 1 $SB bench fanout --ws ws://127.0.0.1:18400/ws/connect --url http://127.0.0.1:18451 --clients 1 --rate 100 --duration 5s --json 2>/dev/null || echo null)}" >> $out
    kill $pid; wait $pid 2>/dev/null; rm -rf $d
  done
done
