#!/usr/bin/env python3
"""Soak: `switchboard up` under ten minutes of mixed, abusive load.

Phase 1 (the soak): one `switchboard up` (embedded store) on 127.0.0.1 and, at
the same time,
  - churners that connect, subscribe to shared and fresh channels, read a while,
    unsubscribe, and close (some recover with `since` on the next connect);
  - publishers on the HTTP API (`POST /api/ws/broadcast`) to the shared channels
    and a flooded channel;
  - stuck clients (4 KiB receive buffer) on the flooded channel that never read;
  - slowloris sockets that send half a request and nothing more;
  - runs of the echo agent: finished, interrupted by run id, enqueued and
    interrupted by thread id;
  - bursts of bad frames: invalid JSON, unknown types, missing fields, a frame
    over 64 KiB, a text frame that is not UTF-8.
Every 10 s it samples the process's RSS, open file descriptors and threads
(/proc) and the gateway's runtime tasks and connections (/metrics) into
soak.csv, and draws soak.svg. It fails when RSS, fds or tasks grow: the mean of
the last third of the samples above the middle third's by more than 10 % plus
a small slack, or fds and tasks not back near their starting level once the
load has stopped; or when a stuck client or a slowloris socket was not let go.

Phase 2 (joins): a second `switchboard up` (memory store, rate limits raised),
the rate of subscribe+unsubscribe pairs of fresh channels over one connection,
then 100,000 channels given an event each (`switchboard bench publish`), then
the same rate again: the ratio is the figure.

Loopback only, bounded in time and count; it stops only the processes it
started. Usage: .ci/soak.py [--duration 600] [--out DIR] [--bin PATH] [--cache-bytes 8MiB]
Needs `websockets` (pip install websockets).
"""

import argparse
import asyncio
import base64
import http.client
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from websockets.asyncio.client import connect

KEY = "soak-admin-key-0123456789abcdef"
SHARED = [f"soak:shared:{i}" for i in range(20)]
FLOOD = "soak:flood"


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Server:
    """A `switchboard up` started here, on ports chosen by the kernel."""

    def __init__(self, binary, workdir, env):
        os.makedirs(workdir, exist_ok=True)
        self.out_path = os.path.join(workdir, "up.out")
        self.err = open(os.path.join(workdir, "up.err"), "w")
        args = [binary, "up", "--data-dir", os.path.join(workdir, "data"),
                "--gateway-listen", "127.0.0.1:0", "--eventbus-listen", "127.0.0.1:0",
                "--agent-bridge-listen", "127.0.0.1:0"]
        self.proc = subprocess.Popen(args, stdout=open(self.out_path, "w"), stderr=self.err,
                                     env={**os.environ, "RUST_LOG": "warn", **env})
        deadline = time.time() + 30
        text = ""
        while time.time() < deadline and "\nmode " not in "\n" + text:
            if self.proc.poll() is not None:
                raise SystemExit(f"switchboard up exited with {self.proc.returncode}; see {workdir}/up.err")
            time.sleep(0.1)
            text = open(self.out_path).read()
        ws = re.search(r"^gateway\s+ws://([\d.]+):(\d+)/", text, re.M)
        bus = re.search(r"^eventbus\s+grpc://(\S+)", text, re.M)
        if not ws or not bus:
            raise SystemExit(f"could not read the addresses from {self.out_path}")
        self.host, self.port = ws.group(1), int(ws.group(2))
        self.bus = "http://" + bus.group(1)
        self.http = f"http://{self.host}:{self.port}"
        self.ws = f"ws://{self.host}:{self.port}/ws/connect"
        for _ in range(100):
            try:
                urllib.request.urlopen(self.http + "/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


# --- sampling -----------------------------------------------------------------

def sample(server, t0):
    pid = server.proc.pid
    status = open(f"/proc/{pid}/status").read()
    rss_kib = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    data = os.path.join(os.path.dirname(server.out_path), "data")
    disk = sum(e.stat().st_size for e in os.scandir(data) if e.is_file())
    metrics = urllib.request.urlopen(server.http + "/metrics", timeout=5).read().decode()

    def gauge(name):
        m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", metrics, re.M)
        return float(m.group(1)) if m else float("nan")

    return {
        "t": round(time.time() - t0, 1),
        "rss_mib": round(rss_kib / 1024, 1),
        "fds": fds,
        "threads": threads,
        "tasks": int(gauge("switchboard_runtime_tasks")),
        "connections": int(gauge("switchboard_connections")),
        "disk_mib": round(disk / 2**20, 1),
    }


async def sampler(server, t0, samples, stop):
    while not stop.is_set():
        samples.append(await asyncio.to_thread(sample, server, t0))
        s = samples[-1]
        log(f"t={s['t']:.0f}s rss={s['rss_mib']} MiB fds={s['fds']} tasks={s['tasks']} conns={s['connections']} "
            f"disk={s['disk_mib']} MiB")
        try:
            await asyncio.wait_for(stop.wait(), 10)
        except asyncio.TimeoutError:
            pass


# --- load ---------------------------------------------------------------------

class Counts(dict):
    def add(self, key, n=1):
        self[key] = self.get(key, 0) + n


async def churner(server, n, stop, counts):
    rng = random.Random(n)
    positions = {}
    fresh = 0
    while not stop.is_set():
        try:
            async with connect(server.ws, max_size=2**20, open_timeout=10) as ws:
                counts.add("connections")
                shared = rng.choice(SHARED)
                frames = [{"type": "subscribe", "channel": shared, "id": "s0"}]
                if shared in positions and rng.random() < 0.5:
                    frames[0]["since"] = positions[shared]
                for _ in range(2):
                    fresh += 1
                    frames.append({"type": "subscribe", "channel": f"soak:fresh:{n}:{fresh}"})
                for f in frames:
                    await ws.send(json.dumps(f))
                deadline = time.monotonic() + rng.uniform(0.5, 3)
                while time.monotonic() < deadline:
                    try:
                        frame = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        break
                    if frame.get("type") == "event" and frame.get("channel") == shared:
                        positions[shared] = {"offset": frame["offset"], "epoch": frame["epoch"]}
                        counts.add("events")
                    elif frame.get("type") == "subscribed" and frame.get("recovered"):
                        counts.add("recovered")
                await ws.send(json.dumps({"type": "unsubscribe", "channel": f"soak:fresh:{n}:{fresh}"}))
        except Exception as e:  # a refused or dropped connection is counted, not fatal
            counts.add(f"churn error {type(e).__name__}")
            await asyncio.sleep(0.5)


def publisher(server, channels, rate, size, stop, counts, name):
    """Posts to the broadcast API over one keep-alive connection (a thread)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    headers = {"Content-Type": "application/json", "X-API-Key": KEY}
    pad = "x" * size
    i = 0
    next_at = time.monotonic()
    while not stop.is_set():
        body = json.dumps({"channel": channels[i % len(channels)], "type": "soak", "message": {"i": i, "pad": pad}})
        try:
            conn.request("POST", "/api/ws/broadcast", body, headers)
            resp = conn.getresponse()
            resp.read()
            counts.add(name if resp.status == 200 else f"{name} http {resp.status}")
        except (OSError, http.client.HTTPException):
            counts.add(f"{name} error")
            conn.close()
            conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        i += 1
        next_at += 1 / rate
        time.sleep(max(0, next_at - time.monotonic()))
    conn.close()


def ws_frame(payload, opcode=1):
    """A masked client frame."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def raw_ws(server, rcvbuf=None):
    """A WebSocket opened by hand on a blocking socket (for clients that misbehave)."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect((server.host, server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws/connect HTTP/1.1\r\nHost: {server.host}:{server.port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise OSError("closed during the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise OSError(head.split(b"\r\n")[0].decode())
    return s


def owned_by_server(server, client_port):
    """Whether the server process still holds its end of the connection from
    `client_port`: a socket it closed is gone from /proc/net/tcp or orphaned
    (inode 0) while the kernel flushes it. Reading the client's end to find out
    would make a stuck client a reading one."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        f = line.split()
        local_port, remote_port = int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16)
        if (local_port, remote_port) == (server.port, client_port):
            return f[9] != "0"
    return False


def released(s, within):
    """Whether the server closed `s`: drains it until EOF for at most `within` seconds."""
    s.settimeout(0.5)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if not s.recv(1 << 16):
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


def stuck_round(server, counts):
    """Four clients that subscribe to the flooded channel and never read, then a check
    that the server let each of them go."""
    socks = []
    for _ in range(4):
        try:
            s = raw_ws(server, rcvbuf=4096)
            s.sendall(ws_frame(json.dumps({"type": "subscribe", "channel": FLOOD}).encode()))
            socks.append(s)
        except OSError:
            counts.add("stuck connect error")
    # write_timeout is 3 s here, and the flood fills their 4 KiB buffers and then
    # the 1 MiB queue within seconds.
    deadline = time.monotonic() + 30
    for s in socks:
        port = s.getsockname()[1]
        while owned_by_server(server, port) and time.monotonic() < deadline:
            time.sleep(0.5)
        counts.add("stuck NOT released" if owned_by_server(server, port) else "stuck released")
        s.close()


def slowloris_round(server, counts):
    """Thirty sockets that send half a request; header_timeout (2 s here) must close them."""
    socks = []
    for _ in range(30):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect((server.host, server.port))
            s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        except OSError:
            counts.add("slowloris connect error")
            s.close()
    time.sleep(6)
    for s in socks:
        counts.add("slowloris released" if released(s, 5) else "slowloris NOT released")
        s.close()


def bad_frames_round(server, counts, rng):
    frames = [b"{not json", b"[]", b'{"type":"nope"}', b'{"type":"subscribe"}', b'{"type":"subscribe","channel":"bad channel!"}',
              b'{"type":"unsubscribe","channel":"never"}', b'{"type":"chat_message"}', b'{"type":"interrupt_stream"}']
    try:
        s = raw_ws(server)
        for _ in range(rng.randint(3, 12)):  # up to 12 protocol errors: past 10 a minute the server closes (4501)
            s.sendall(ws_frame(rng.choice(frames)))
        ending = rng.choice(["oversized", "utf8", "close"])
        if ending == "oversized":
            s.sendall(ws_frame(b'{"type":"ping","pad":"' + b"x" * 70_000 + b'"}'))
        elif ending == "utf8":
            s.sendall(ws_frame(b'{"type":"ping","x":"\xff\xfe"}'))
        else:
            s.sendall(ws_frame(b"", opcode=8))
        counts.add("bad frames released" if released(s, 10) else "bad frames NOT released")
        s.close()
    except OSError:
        counts.add("bad frames connect error")


def periodic(fn, every, stop, *args):
    while not stop.is_set():
        fn(*args)
        stop.wait(every)


async def runner(server, n, stop, counts):
    """Echo runs: finished, interrupted by run id, enqueued and interrupted by thread id."""
    rng = random.Random(1000 + n)
    words = " ".join(f"w{i}" for i in range(30))
    while not stop.is_set():
        try:
            async with connect(server.ws, open_timeout=10) as ws:
                thread = None
                for k in range(10):
                    if stop.is_set():
                        break
                    mode = rng.choice(["finish", "interrupt_run", "enqueue"])
                    msg = {"type": "chat_message", "agent": "echo", "content": words, "id": f"m{k}"}
                    if thread:
                        msg["thread_id"] = thread
                    await ws.send(json.dumps(msg))
                    if mode == "enqueue" and thread:
                        for j in range(3):
                            await ws.send(json.dumps({**msg, "multitask": "enqueue", "id": f"q{k}.{j}"}))
                    interrupted = False
                    started = time.monotonic()
                    while True:
                        frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
                        ev = frame.get("event") or {}
                        if frame.get("type") == "agent_event" and ev.get("type") == "RUN_STARTED":
                            thread = ev.get("threadId", thread)
                            run = ev.get("runId")
                            if mode == "interrupt_run" and not interrupted:
                                await ws.send(json.dumps({"type": "interrupt_stream", "run_id": run, "id": "i"}))
                                interrupted = True
                        if mode == "enqueue" and not interrupted and thread and time.monotonic() - started > 0.2:
                            await ws.send(json.dumps({"type": "interrupt_stream", "thread_id": thread, "id": "i"}))
                            interrupted = True
                        if frame.get("type") == "agent_event" and ev.get("type") in ("RUN_FINISHED", "RUN_ERROR"):
                            counts.add(f"run {ev['type']}")
                            if mode != "enqueue":
                                break
                        if frame.get("type") == "interrupted" and mode == "enqueue":
                            break
                        if frame.get("type") == "error" and frame.get("id") == f"m{k}":
                            counts.add(f"run refused {frame.get('code')}")
                            break
                    if mode == "enqueue":
                        # The rest of the queue is answered `thread_busy`; let it drain.
                        deadline = time.monotonic() + 2
                        while time.monotonic() < deadline:
                            try:
                                await asyncio.wait_for(ws.recv(), deadline - time.monotonic())
                            except asyncio.TimeoutError:
                                break
        except Exception as e:
            counts.add(f"run error {type(e).__name__}")
            await asyncio.sleep(0.5)


async def soak(server, duration, counts):
    t0 = time.time()
    samples = []
    stop = asyncio.Event()
    tstop = threading.Event()
    sampling = asyncio.create_task(sampler(server, t0, samples, stop))
    while not samples:
        await asyncio.sleep(0.1)
    baseline = samples[0]
    rng = random.Random(7)
    threads = [
        asyncio.to_thread(publisher, server, SHARED, 100, 200, tstop, counts, "published"),
        asyncio.to_thread(publisher, server, [FLOOD], 150, 1000, tstop, counts, "flooded"),
        asyncio.to_thread(periodic, stuck_round, 10, tstop, server, counts),
        asyncio.to_thread(periodic, slowloris_round, 4, tstop, server, counts),
        asyncio.to_thread(periodic, bad_frames_round, 2, tstop, server, counts, rng),
    ]
    tasks = [asyncio.create_task(churner(server, n, stop, counts)) for n in range(40)]
    tasks += [asyncio.create_task(runner(server, n, stop, counts)) for n in range(3)]
    gathered = asyncio.gather(*threads)
    await asyncio.sleep(duration)
    log("load stops")
    stop.set()
    tstop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await gathered
    # Idle: what the load held must be given back.
    await asyncio.sleep(15)
    after = await asyncio.to_thread(sample, server, t0)
    sampling.cancel()
    await asyncio.gather(sampling, return_exceptions=True)
    return baseline, samples, after


def growth_verdicts(baseline, samples, after):
    load = [s for s in samples if s["t"] >= 60]  # the first minute warms up
    third = len(load) // 3
    verdicts = []
    for key, slack in (("rss_mib", 8), ("fds", 20), ("tasks", 30)) if third else ():
        mid = statistics.mean(s[key] for s in load[third:2 * third])
        last = statistics.mean(s[key] for s in load[2 * third:])
        ok = last <= mid * 1.10 + slack
        verdicts.append((f"{key}: middle third {mid:.1f}, last third {last:.1f}", ok))
    for key, slack in (("fds", 5), ("tasks", 10), ("connections", 0)):
        ok = after[key] <= baseline[key] + slack
        verdicts.append((f"{key} at rest: {baseline[key]} before the load, {after[key]} 15 s after it", ok))
    return verdicts


def svg(samples, path):
    """Three small line charts, drawn by hand (no plotting library needed)."""
    panels = [("rss_mib", "RSS (MiB)"), ("fds", "open file descriptors"), ("tasks", "runtime tasks")]
    w, h, pad = 720, 170, 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h * len(panels)}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h * len(panels)}" fill="white"/>']
    tmax = max(s["t"] for s in samples) or 1
    for i, (key, label) in enumerate(panels):
        y0 = i * h
        vmax = max(s[key] for s in samples) * 1.15 or 1
        x = lambda t: pad + (w - 2 * pad) * t / tmax
        y = lambda v: y0 + h - 25 - (h - 45) * v / vmax
        pts = " ".join(f"{x(s['t']):.1f},{y(s[key]):.1f}" for s in samples)
        out += [f'<text x="{pad}" y="{y0 + 14}" font-weight="bold">{label}</text>',
                f'<line x1="{pad}" y1="{y(0):.1f}" x2="{w - pad}" y2="{y(0):.1f}" stroke="#999"/>',
                f'<line x1="{pad}" y1="{y(0):.1f}" x2="{pad}" y2="{y(vmax):.1f}" stroke="#999"/>',
                f'<text x="4" y="{y(vmax / 1.15) + 4:.1f}">{vmax / 1.15:.0f}</text>',
                f'<text x="4" y="{y(0) + 4:.1f}">0</text>',
                f'<text x="{w - pad}" y="{y(0) + 14:.1f}" text-anchor="end">{tmax:.0f} s</text>',
                f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{pts}"/>']
    out.append("</svg>")
    open(path, "w").write("\n".join(out))


# --- phase 2: joins -------------------------------------------------------------

async def join_rate(server, pairs):
    """Subscribe+unsubscribe pairs of fresh channels per second, over one connection,
    64 pairs in flight."""
    async with connect(server.ws) as ws:
        await ws.recv()  # connected
        tag = os.urandom(4).hex()
        started = time.monotonic()
        sent = answered = 0
        while answered < 2 * pairs:
            while sent < pairs and sent - answered // 2 < 64:
                ch = f"joins:{tag}:{sent}"
                await ws.send(json.dumps({"type": "subscribe", "channel": ch, "id": f"s{sent}"}))
                await ws.send(json.dumps({"type": "unsubscribe", "channel": ch, "id": f"u{sent}"}))
                sent += 1
            frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if frame.get("type") in ("subscribed", "unsubscribed"):
                answered += 1
            elif frame.get("type") == "error":
                raise SystemExit(f"join refused: {frame}")
        return pairs / (time.monotonic() - started)


def joins(binary, workdir):
    server = Server(binary, workdir, {"SWITCHBOARD_EVENTBUS__BACKEND": "memory", "SWITCHBOARD_AUTH__ADMIN_KEY": KEY,
                                      "SWITCHBOARD_LIMITS__RATE_PER_SECOND": "1000000",
                                      "SWITCHBOARD_LIMITS__RATE_BURST": "1000000"})
    try:
        asyncio.run(join_rate(server, 2000))  # warm-up
        before = asyncio.run(join_rate(server, 10_000))
        log(f"joins: {before:.0f} pairs/s with few channels known; giving 100,000 channels an event")
        bench = subprocess.run([binary, "bench", "publish", "--url", server.bus, "--key", KEY, "--publishers", "64",
                                "--channels", "100000", "--size", "64", "--stream", "--duration", "10s", "--json"],
                               capture_output=True, text=True, check=True)
        published = json.loads(bench.stdout.strip().splitlines()[-1])
        events = published["events"]
        after = asyncio.run(join_rate(server, 10_000))
        log(f"joins: {after:.0f} pairs/s with 100,000 channels known")
        return before, after, events
    finally:
        server.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    p.add_argument("--out", default=None, help="directory for soak.csv, soak.svg, summary.md")
    p.add_argument("--bin", default=None, help="the switchboard binary (default target/release/switchboard)")
    p.add_argument("--cache-bytes", default="8MiB",
                   help="eventbus.cache_bytes (default 8MiB: small, so that the bounded page cache fills "
                        "in the first minutes and growth past it shows)")
    args = p.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    binary = args.bin or os.path.join(root, "target", "release", "switchboard")
    out = args.out or os.path.join(root, "target", "soak", time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="soak-")
    counts = Counts()
    try:
        log(f"phase 1: {args.duration:.0f} s of mixed load; results in {out}")
        server = Server(binary, os.path.join(work, "soak"), {
            "SWITCHBOARD_AUTH__ADMIN_KEY": KEY,
            "SWITCHBOARD_LIMITS__HEADER_TIMEOUT": "2s",
            "SWITCHBOARD_LIMITS__WRITE_TIMEOUT": "3s",
            "SWITCHBOARD_EVENTBUS__CACHE_BYTES": args.cache_bytes,
        })
        try:
            baseline, samples, after = asyncio.run(soak(server, args.duration, counts))
        finally:
            server.stop()
        with open(os.path.join(out, "soak.csv"), "w") as f:
            keys = list(samples[0])
            f.write(",".join(keys) + "\n")
            for s in samples:
                f.write(",".join(str(s[k]) for k in keys) + "\n")
        svg(samples, os.path.join(out, "soak.svg"))
        verdicts = growth_verdicts(baseline, samples, after)
        for what in ("stuck", "slowloris", "bad frames"):
            verdicts.append((f"{what}: {counts.get(what + ' released', 0)} let go by the server, "
                             f"{counts.get(what + ' NOT released', 0)} not", counts.get(what + " NOT released", 0) == 0
                             and counts.get(what + " released", 0) > 0))
        log("phase 2: join rate")
        before, after_rate, events = joins(binary, os.path.join(work, "joins"))
        ratio = after_rate / before
        verdicts.append((f"joins: {before:.0f} pairs/s, then {after_rate:.0f} pairs/s with 100,000 channels known "
                         f"({events} events published; ratio {ratio:.2f})", ratio >= 0.8))
        lines = ["# Soak", "", f"{args.duration:.0f} s of mixed load, samples every 10 s: {len(samples)}", "",
                 "| check | verdict |", "|---|---|"]
        lines += [f"| {what} | {'ok' if ok else 'FAIL'} |" for what, ok in verdicts]
        lines += ["", "Load:", ""] + [f"- {k}: {v}" for k, v in sorted(counts.items())]
        summary = "\n".join(lines) + "\n"
        open(os.path.join(out, "summary.md"), "w").write(summary)
        print(summary)
        failed = [w for w, ok in verdicts if not ok]
        if failed:
            log(f"FAILED: {failed}")
            sys.exit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
