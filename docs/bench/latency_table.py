#!/usr/bin/env python3
"""Prints the rounds of docs/bench/latency.sh output: p50/p99 (ms) and the ratio to the round's rust_bare.
Usage: latency_table.py OUT.jsonl [OUT2.jsonl ...]  (a round starts at each rust_bare/e line)"""
import json, sys

for path in sys.argv[1:]:
    print(f"== {path}")
    rounds = []
    for line in open(path):
        row = json.loads(line)
        if row["label"] == "rust_bare/e":
            rounds.append({})
        rounds[-1][row["label"]] = row
    for n, r in enumerate(rounds, 1):
        print(f"round {n}")
        for label, row in r.items():
            if "lat_us" in row:
                lat = row["lat_us"]
                bare = r.get("rust_bare/" + label.split("/")[1], {}).get("lat_us")
                ratio = f"  {lat['p50'] / bare['p50']:.2f}x / {lat['p99'] / bare['p99']:.2f}x bare" if bare else ""
                print(f"  {label:28} p50 {lat['p50'] / 1000:7.2f}  p99 {lat['p99'] / 1000:7.2f}  loss {row['loss']}  steal {row.get('host_steal_pct')}{ratio}")
            elif row.get("out"):
                l = row["out"]["latency"]
                print(f"  {label:28} p50 {l['p50_ms']:7.2f}  p99 {l['p99_ms']:7.2f}  loss {row['out']['loss']}")
