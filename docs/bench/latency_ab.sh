#!/bin/bash
# Same-run A/B of two switchboard binaries with docs/bench/latency.sh: rounds alternate, each with its own rust_bare.
# Usage: docs/bench/latency_ab.sh BEFORE_BIN AFTER_BIN OUT_PREFIX [ROUNDS]  -> OUT_PREFIX-before.jsonl, OUT_PREFIX-after.jsonl
set -u
before=${1:?before binary}; after=${2:?after binary}; out=${3:?out prefix}; rounds=${4:-2}
here=$(dirname "$0")
for r in $(seq 1 "$rounds"); do
  SB=$before "$here/latency.sh" "$out-before.jsonl" 1
  SB=$after "$here/latency.sh" "$out-after.jsonl" 1
done
