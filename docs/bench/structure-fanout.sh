#!/bin/bash
# (The paths are those of the session that ran it: /work/sb-before built from ca4cb72, /work/sb-after from dddbcc2, the harness loadgen built in /tmp/h.)
# Issue 11: fan-out at 1,000 subscribers, before (ca4cb72) and after (HEAD) the structure work, interleaved.
out=/tmp/fan11.jsonl; : > $out
for round in 1 2 3; do
  for which in before after; do
    d=$(mktemp -d)
    SWITCHBOARD_AUTH__ADMIN_KEY=bench-admin-key-0123456789 taskset -c 0 /work/sb-$which up --backend memory --data-dir $d --gateway-listen 127.0.0.1:18400 --eventbus-listen 127.0.0.1:18451 --agent-bridge-listen 127.0.0.1:18452 > $d/out 2>$d/err &
    pid=$!
    for i in $(seq 1 100); do grep -q "^gateway" $d/out 2>/dev/null && break; sleep 0.1; done
    sleep 0.5
    LOADGEN_AUTH=bench-admin-key-0123456789 taskset -c 1 /tmp/h/tgt/release/loadgen --target ws://127.0.0.1:18400/ws/connect --conns 1000 --msgs 2000 --rate max --inflight 8 --payload 256 --server-pid $pid --deadline 60 --label $which/a/$round >> $out 2>/dev/null
    LOADGEN_AUTH=bench-admin-key-0123456789 taskset -c 1 /tmp/h/tgt/release/loadgen --target ws://127.0.0.1:18400/ws/connect --conns 1000 --msgs 1000 --rate 100 --inflight 4 --payload 256 --server-pid $pid --deadline 60 --label $which/e/$round >> $out 2>/dev/null
    kill $pid; wait $pid 2>/dev/null; rm -rf $d
  done
done
