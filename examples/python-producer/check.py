#!/usr/bin/env python3
"""End-to-end check: events published with producer.py reach a browser client.

It opens a WebSocket to the gateway, subscribes to a fresh channel, runs
producer.py as a subprocess (unary `Publish`, `PublishStream`, a repeated
idempotency key and a rejected channel name), and asserts that the WebSocket
received exactly the events the producer reported, in offset order, with the
data that was sent.

    python check.py --ws ws://127.0.0.1:8000/ws/connect --grpc 127.0.0.1:50051

The last line of output is `N passed, M failed`; the exit status is 0 only
when M is 0. Every wait is bounded, so the check ends on its own even when the
server never answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

PRODUCER = Path(__file__).resolve().parent / "producer.py"

CONNECT_TIMEOUT = 5.0  # WebSocket handshake, `connected` and `subscribed` frames
PRODUCER_TIMEOUT = 30.0  # one producer.py run, including stub generation
GRACE = 1.0  # extra wait after the last expected event, to catch unexpected ones


class Checks:
    """Counts and prints named pass/fail checks."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"PASS  {name}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL  {name}" + (f": {detail}" if detail else ""), flush=True)
        return ok

    def summary(self) -> str:
        return f"{self.passed} passed, {self.failed} failed"


class ProducerRun:
    """The outcome of one producer.py subprocess."""

    def __init__(self, returncode: int, results: list[dict], stderr: str) -> None:
        self.returncode = returncode
        self.results = results  # one parsed --json line per event
        self.stderr = stderr


async def run_producer(args: argparse.Namespace, *extra: str) -> ProducerRun:
    """Run producer.py with `--json` and parse its output.

    Runs asynchronously so that the WebSocket keeps being read meanwhile.
    """
    command = [sys.executable, str(PRODUCER), "--url", args.grpc, "--json", "--timeout", "5"]
    if args.key:
        command += ["--key", args.key]
    command += list(extra)
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), PRODUCER_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return ProducerRun(-1, [], f"producer.py timed out after {PRODUCER_TIMEOUT:.0f} s")
    results = []
    for line in stdout.decode().splitlines():
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # not a result line
    return ProducerRun(proc.returncode, results, stderr.decode().strip())


async def recv_frame(ws: ClientConnection, kind: str, request_id=None) -> dict:
    """Wait for the next frame of type `kind` (or an `error` answering `request_id`)."""
    async with asyncio.timeout(CONNECT_TIMEOUT):
        while True:
            frame = json.loads(await ws.recv())
            if frame.get("type") == kind:
                return frame
            if frame.get("type") == "error" and request_id is not None and frame.get("id") == request_id:
                raise RuntimeError(f"{frame.get('code')}: {frame.get('message')}")
            # Anything else (such as a heartbeat `ping`) is not what we wait for.


async def read_events(ws: ClientConnection, channel: str, events: asyncio.Queue, errors: list) -> None:
    """Background reader: queue this channel's `event` frames, keep `error`
    frames and an early close as errors."""
    try:
        async for message in ws:
            frame = json.loads(message)
            if frame.get("type") == "event" and frame.get("channel") == channel:
                events.put_nowait(frame)
            elif frame.get("type") == "error":
                errors.append(frame)
            # `ping` and other frames are ignored.
    except ConnectionClosed as closed:
        errors.append({"type": "closed", "reason": str(closed)})
    else:
        errors.append({"type": "closed", "reason": "the server closed the connection"})


async def collect(events: asyncio.Queue, expected: int, deadline: float) -> list[dict]:
    """Take events until `expected` arrived or `deadline` passed, then wait
    `GRACE` seconds more for any unexpected extra event."""
    received: list[dict] = []
    while len(received) < expected:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return received
        try:
            received.append(await asyncio.wait_for(events.get(), remaining))
        except asyncio.TimeoutError:
            return received
    await asyncio.sleep(GRACE)
    while not events.empty():
        received.append(events.get_nowait())
    return received


def check_run(checks: Checks, name: str, run: ProducerRun, count: int, duplicate: bool) -> bool:
    """A producer run succeeded with `count` results, each with the given `duplicate`."""
    ok = checks.check(f"{name}: producer exits 0", run.returncode == 0,
                      f"exit status {run.returncode}: {run.stderr}")
    ok &= checks.check(f"{name}: {count} result(s) reported", len(run.results) == count,
                       f"got {len(run.results)}")
    flags = [r.get("duplicate") for r in run.results]
    ok &= checks.check(f"{name}: duplicate={str(duplicate).lower()}",
                       bool(flags) and all(f is duplicate for f in flags), f"got {flags}")
    return ok


async def run_checks(args: argparse.Namespace, checks: Checks) -> None:
    channel = args.channel
    # Normally the same as `channel`; pointing it elsewhere shows that the
    # delivery checks really fail when nothing arrives.
    publish_channel = args.publish_channel or channel
    idempotency_key = f"ci-{secrets.token_hex(4)}"

    async with connect(args.ws, open_timeout=CONNECT_TIMEOUT, close_timeout=2) as ws:
        connected = await recv_frame(ws, "connected")
        checks.check("websocket connected", True)

        await ws.send(json.dumps({"type": "subscribe", "channel": channel, "id": 1}))
        subscribed = await recv_frame(ws, "subscribed", request_id=1)
        position = subscribed.get("position") or {}
        if not checks.check(f"subscribed to {channel}",
                            subscribed.get("channel") == channel and subscribed.get("id") == 1
                            and "offset" in position and "epoch" in position,
                            f"unexpected frame {subscribed}"):
            return
        print(f"      connection {connected.get('connection_id')}, "
              f"channel at offset {position['offset']}, epoch {position['epoch']}", flush=True)

        events: asyncio.Queue = asyncio.Queue()
        errors: list[dict] = []
        reader = asyncio.create_task(read_events(ws, channel, events, errors))
        deadline = time.monotonic() + args.timeout
        try:
            common = ["--channel", publish_channel]
            # Missions 1-3 with one Publish call each, 4-6 over one PublishStream.
            unary = await run_producer(args, *common, "--count", "3", "--first-id", "1")
            check_run(checks, "Publish x3", unary, 3, duplicate=False)
            stream = await run_producer(args, *common, "--count", "3", "--first-id", "4", "--stream")
            check_run(checks, "PublishStream x3", stream, 3, duplicate=False)

            # Mission 7 twice with the same idempotency key: stored once.
            idem = ["--count", "1", "--first-id", "7", "--idempotency-key", idempotency_key]
            first = await run_producer(args, *common, *idem)
            check_run(checks, "idempotency key, first publish", first, 1, duplicate=False)
            repeat = await run_producer(args, *common, *idem)
            if check_run(checks, "idempotency key, repeat", repeat, 1, duplicate=True) and first.results:
                same = all(repeat.results[0].get(k) == first.results[0].get(k)
                           for k in ("event_id", "offset", "epoch"))
                checks.check("idempotency key, repeat answers the first position", same,
                             f"first {first.results[0]}, repeat {repeat.results[0]}")

            # A bad channel name is a gRPC error; the producer must say so and fail.
            bad = await run_producer(args, "--channel", "bad channel", "--count", "1")
            checks.check("invalid channel: producer exits 1 with INVALID_ARGUMENT",
                         bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr,
                         f"exit status {bad.returncode}: {bad.stderr}")

            # What the WebSocket must receive: every stored (non-duplicate) event.
            expected = [r for run in (unary, stream, first) for r in run.results]
            received = await collect(events, len(expected), deadline)
        finally:
            reader.cancel()

    check_delivery(checks, channel, position, expected, received, errors, args.timeout)


def check_delivery(checks: Checks, channel: str, position: dict, expected: list[dict],
                   received: list[dict], errors: list[dict], timeout: float) -> None:
    """Compare the events the WebSocket received with those the producer reported."""
    checks.check(f"websocket received exactly {len(expected)} events within {timeout:g} s",
                 len(received) == len(expected) and len(expected) > 0,
                 f"received {len(received)}")
    offsets = [e.get("offset") for e in received]
    checks.check("events arrive in increasing offset order",
                 bool(offsets) and offsets == sorted(set(offsets))
                 and offsets[0] > position["offset"],
                 f"offsets {offsets}, subscribed at {position['offset']}")
    checks.check("event ids and offsets match the producer's results",
                 bool(received) and [(e.get("id"), e.get("offset")) for e in received]
                 == [(r.get("event_id"), r.get("offset")) for r in expected],
                 f"received {[(e.get('id'), e.get('offset')) for e in received]}")
    mismatched = [
        e for e, r in zip(received, expected)
        if (e.get("channel"), e.get("event"), e.get("data"), e.get("epoch"))
        != (channel, r.get("event"), r.get("data"), position["epoch"])
    ]
    checks.check("event names, data and epoch match what was published",
                 bool(received) and not mismatched, f"mismatched {mismatched[:3]}")
    checks.check("no error frames or disconnect on the websocket", not errors, f"{errors[:3]}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Check producer.py against a running Switchboard.")
    parser.add_argument("--ws", required=True, help="gateway WebSocket URL, ws://HOST:PORT/ws/connect")
    parser.add_argument("--grpc", required=True, help="event bus address, HOST:PORT")
    parser.add_argument("--channel", default=f"task:ci-{secrets.token_hex(4)}",
                        help="channel to subscribe and publish to (default: a fresh task:ci-<random>)")
    parser.add_argument("--publish-channel", default="",
                        help="publish to this channel instead (to see the check fail)")
    parser.add_argument("--key", default="", help="event bus API key, if it needs one")
    parser.add_argument("--timeout", type=float, default=15.0,
                        help="seconds for all events to arrive (default: %(default)s)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    checks = Checks()
    try:
        asyncio.run(run_checks(args, checks))
    except Exception as err:  # connection refused, timeouts, bad frames...
        checks.check("check ran to completion", False, f"{type(err).__name__}: {err}")
    print(checks.summary())
    return 0 if checks.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
