#!/usr/bin/env python3
"""Summary of one `.ci/bench` run: every target of issue 6, its figure, ratio and verdict.

Usage: bench-summary.py OUT_DIR   (prints markdown)
"""
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
fanout = out / "fanout.jsonl"  # absent when every harness run failed (or ROUNDS=0)
rows = [json.loads(line) for line in fanout.read_text().splitlines() if line.strip()] if fanout.exists() else []
rows = [r for r in rows if not r.get("meta") and "error" not in r]


def med(peer, scenario, field):
    vals = []
    for r in rows:
        if r["tags"]["peer"] != peer or r["tags"]["scenario"] != scenario:
            continue
        v = r
        for part in field.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else None


def runs(peer, scenario):
    return sum(1 for r in rows if r["tags"]["peer"] == peer and r["tags"]["scenario"] == scenario)


def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() and p.read_text().strip() else None


def fmt(v, unit=""):
    if v is None:
        return "n/a"
    return f"{v:,.0f}{unit}" if abs(v) >= 100 or float(v).is_integer() else f"{v:,.2f}{unit}"


def ratio(a, b):
    return a / b if a is not None and b else None


def verdict(ok):
    return "n/a" if ok is None else ("met" if ok else "missed")


SCENARIOS = {
    "a": "a: 1,000 subscribers, max rate",
    "b": "b: 10,000 subscribers, max rate",
    "c": "c: 10,000 idle connections",
    "e": "e: 1,000 subscribers × 100 msg/s",
}
lines = []
table = []
for scen, what in (("a", "1,000"), ("b", "10,000")):
    sb, bare, sio = (med(p, scen, "delivered_per_s") for p in ("switchboard", "rust_bare", "socketio_node"))
    rb, rs = ratio(sb, bare), ratio(sb, sio)
    ok = None if rb is None or rs is None else (rb >= 0.8 and rs >= 4)
    loss = med("switchboard", scen, "loss")
    table.append((f"fan-out, {what} subscribers: ≥ 0.8× rust_bare, ≥ 4× Socket.IO",
                  f"{fmt(sb)} deliveries/s (rust_bare {fmt(bare)}, Socket.IO {fmt(sio)}; loss {fmt(loss)})",
                  f"{fmt(rb)}× / {fmt(rs)}×", verdict(ok)))
sb99, bare99 = med("switchboard", "e", "lat_us.p99"), med("rust_bare", "e", "lat_us.p99")
sb50, bare50 = med("switchboard", "e", "lat_us.p50"), med("rust_bare", "e", "lat_us.p50")
r99 = ratio(sb99, bare99)
table.append(("p99 latency, 1,000 subscribers × 100 msg/s: ≤ 1.2× rust_bare",
              f"{fmt(sb99 and sb99 / 1000)} ms (rust_bare {fmt(bare99 and bare99 / 1000)} ms); "
              f"p50 {fmt(sb50 and sb50 / 1000)} vs {fmt(bare50 and bare50 / 1000)} ms",
              f"{fmt(r99)}×", verdict(None if r99 is None else r99 <= 1.2)))
rss, bare_rss = med("switchboard", "c", "rss_per_conn_bytes"), med("rust_bare", "c", "rss_per_conn_bytes")
table.append(("idle memory at 10,000 connections: ≤ 6 KiB per connection",
              f"{fmt(rss and rss / 1024)} KiB (rust_bare {fmt(bare_rss and bare_rss / 1024)} KiB)",
              f"{fmt(ratio(rss, bare_rss))}× rust_bare", verdict(None if rss is None else rss <= 6144)))
c19 = load("conns19k.json")
if c19:
    ok = c19["clients"] >= 19000 and c19["connect_errors"] == 0 and c19["closed_by_server"] == 0 and c19["loss"] == 0
    table.append(("19,000 connections on one gateway, heartbeats, no errors",
                  f"{c19['clients']:,} held 45 s, {c19['connect_errors']} connect errors, "
                  f"{c19['closed_by_server']} closed by the server, loss {c19['loss']}, "
                  f"{fmt(c19['rss_bytes_per_connection_idle'])} B/conn idle, "
                  f"{fmt(c19['rss_bytes_per_connection_loaded'])} B/conn loaded", "", verdict(ok)))
parts = [load(f"conns100k-{i}.json") for i in range(1, 7)]
if all(parts):
    clients = sum(p["clients"] for p in parts)
    errors = sum(p["connect_errors"] for p in parts)
    closed = sum(p["closed_by_server"] for p in parts)
    per_conn = statistics.mean(p["rss_bytes_per_connection_idle"] or 0 for p in parts)
    ok = clients >= 100000 and errors == 0 and closed == 0
    table.append(("100,000 connections across six gateways on one bus",
                  f"{clients:,} held 50 s past the last connect, {errors} connect errors, {closed} closed by the "
                  f"server, {fmt(per_conn)} B/conn", "", verdict(ok)))
pubs = {n: load(f"publish-{n}.json") for n in ("embedded-stream", "embedded-unary", "memory-stream")}
if pubs["embedded-stream"]:
    best = max(p["events_per_s"] for p in pubs.values() if p and p is not pubs["memory-stream"])
    mem = pubs["memory-stream"] and pubs["memory-stream"]["events_per_s"]
    unary = pubs["embedded-unary"] and pubs["embedded-unary"]["events_per_s"]
    table.append(("durable publish (embedded, fsync = always), 256 publishers: ≥ 100,000 events/s",
                  f"{fmt(pubs['embedded-stream']['events_per_s'])}/s pipelined (`PublishStream`), "
                  f"{fmt(unary)}/s unary; memory backend {fmt(mem)}/s pipelined",
                  f"{fmt(ratio(best, 100000))}× target, {fmt(ratio(pubs['embedded-stream']['events_per_s'], mem))}× memory",
                  verdict(best >= 100000)))

started = (out / "started").read_text().strip() if (out / "started").exists() else "?"
finished = (out / "finished").read_text().strip() if (out / "finished").exists() else "?"
machine = "; ".join(" ".join(line.split()) for line in (out / "machine").read_text().splitlines()) \
    if (out / "machine").exists() else "?"
lines.append(f"One run of `.ci/bench`, {started} to {finished}; {machine}.")
rounds = max((runs("switchboard", s) for s in "abce"), default=0)
lines.append(f"Fan-out rows are medians of {rounds} round(s), servers on CPU 0 and the load generator on CPU 1.")
lines.append("")
lines.append("| target | measured | ratio | verdict |")
lines.append("|---|---|---|---|")
for t in table:
    lines.append("| " + " | ".join(t) + " |")
lines.append("")
lines.append("| peer | scenario | delivered/s | p50 ms | p99 ms | loss | RSS/conn | runs |")
lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
for peer in ("switchboard", "rust_bare", "socketio_node"):
    for scen in "abce":
        if not runs(peer, scen):
            continue
        p50, p99 = med(peer, scen, "lat_us.p50"), med(peer, scen, "lat_us.p99")
        rss = med(peer, scen, "rss_per_conn_bytes")
        rate, lat50, lat99 = fmt(med(peer, scen, "delivered_per_s")), fmt(p50 and p50 / 1000), fmt(p99 and p99 / 1000)
        if scen == "c":  # idle: nothing is published
            rate = lat50 = lat99 = "-"
        lines.append(f"| {peer} | {SCENARIOS[scen]} | {rate} | {lat50} | {lat99} | {fmt(med(peer, scen, 'loss'))} | "
                     f"{fmt(rss and rss / 1024, ' KiB')} | {runs(peer, scen)} |")
print("\n".join(lines))
