#!/bin/bash
# Issue 16, item 2: `switchboard bench runs` (1,000 concurrent runs x 20 tokens/s) with two binaries, rounds interleaved.
# Server (`up`, embedded, fsync always) on CPU 0, the bench on CPU 1.
# Usage: docs/bench/runs_ab.sh BEFORE_BIN AFTER_BIN OUT.jsonl [ROUNDS]
set -u
before=${1:?before binary}; after=${2:?after binary}; out=${3:?out.jsonl}; rounds=${4:-2}
KEY=bench-admin-key-0123456789
wait_port() { for i in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.1; done; }
for r in $(seq 1 "$rounds"); do
  for which in before after; do
    SB=${!which}; d=$(mktemp -d)
    SWITCHBOARD_AUTH__ADMIN_KEY=$KEY SWITCHBOARD_EVENTBUS__FSYNC=always taskset -c 0 $SB up --backend embedded --data-dir $d \
      --gateway-listen 127.0.0.1:18400 --eventbus-listen 127.0.0.1:18451 --agent-bridge-listen 127.0.0.1:18452 > $d/out 2>$d/err & pid=$!
    wait_port 18400; wait_port 18452; sleep 0.5
    echo "{\"label\":\"$which/runs-1000\",\"out\":$(SWITCHBOARD_AUTH__ADMIN_KEY=$KEY taskset -c 1 timeout 60 $SB bench runs --ws ws://127.0.0.1:18400/ws/connect \
      --bridge http://127.0.0.1:18452 --runs 1000 --connections 100 --tokens 40 --rate 20 --duration 20s --json 2>/dev/null || echo null)}" >> "$out"
    kill $pid; wait $pid 2>/dev/null; rm -rf $d
  done
done
