#!/usr/bin/env python3
"""End-to-end check: worker.py serves runs and methods to a browser client.

It starts worker.py as a subprocess against the agent bridge, waits until
`get_status` lists it, and then, over the gateway's WebSocket, checks that:

  (a) a chat_message to the worker's agent streams RUN_STARTED .. RUN_FINISHED
      with the expected text, word by word;
  (b) more messages on the same thread, each sent as soon as the previous run
      finished, say "message 2", "message 3", "message 4" (the history reached
      the worker), and none is refused with thread_busy;
  (c) rpc `add` {a: 2, b: 3} answers 5, and bad params answer the worker's error;
  (d) rpc execute_command {command: "reverse", args: {text: "abc"}} answers "cba",
      and rpc `whoami` answers the caller (user id and roles) the worker saw;
  (e) two runs on two threads are served at the same time;
  (f) interrupt_stream ends a long run with RUN_ERROR `cancelled` within 2 s,
      and the worker stops that run;
  (g) killing the worker (SIGKILL) in the middle of a run ends the run with
      RUN_ERROR `agent_lost`, and the worker disappears from get_status.

    python check.py --ws ws://127.0.0.1:8000/ws/connect --bridge 127.0.0.1:50052 \
        --token "$TOKEN" --expect-user dev --expect-roles admin

get_status lists workers only to callers with the `admin` role (the token
`switchboard up --dev` prints has it).

The last line of output is `N passed, M failed`; the exit status is 0 only
when M is 0. Every wait is bounded, and the worker is stopped in all cases.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

WORKER = Path(__file__).resolve().parent / "worker.py"

CONNECT_TIMEOUT = 5.0  # WebSocket handshake and `connected` frame
REPLY_TIMEOUT = 10.0  # `run` and `rpc_response` frames
ATTACH_TIMEOUT = 30.0  # worker start-up, stub generation included
RUN_TIMEOUT = 15.0  # one whole short run
CANCEL_WITHIN = 2.0  # interrupt_stream -> RUN_ERROR cancelled
LOST_WITHIN = 5.0  # SIGKILL -> RUN_ERROR agent_lost
WORD_DELAY = 0.03  # worker.py --delay
# A long message: about 250 words, so 7-8 s of streaming at WORD_DELAY.
LONG_TEXT = " ".join(f"word{i}" for i in range(250))


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


def expected_reply(text: str, n: int) -> str:
    """What worker.py answers to `text`, the n-th user message of its thread."""
    return f"You said: {text} (message {n} of this thread)"


class ChatRefused(Exception):
    """A chat_message answered with an `error` frame."""

    def __init__(self, frame: dict) -> None:
        super().__init__(f"chat_message answered {json.dumps(frame)}")
        self.frame = frame


class Gateway:
    """A WebSocket client of the gateway. One reader task routes frames: those
    with an `id` answer a request, `agent_event` frames queue per run."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 0
        self.pending: dict[int, asyncio.Future] = {}
        self.runs: defaultdict[str, asyncio.Queue] = defaultdict(asyncio.Queue)
        self.stray: list[dict] = []  # error frames that answer nothing we asked
        self.arrivals = 0  # numbers agent_event frames in the order they arrive
        self.reader = asyncio.create_task(self.read())

    async def read(self) -> None:
        try:
            async for message in self.ws:
                frame = json.loads(message)
                kind = frame.get("type")
                if kind == "agent_event":
                    self.arrivals += 1
                    frame["arrival"] = self.arrivals
                    self.runs[frame.get("run_id")].put_nowait(frame)
                elif frame.get("id") in self.pending:
                    future = self.pending.pop(frame["id"])
                    if not future.done():
                        future.set_result(frame)
                elif kind == "error":
                    self.stray.append(frame)
                # `ping` and anything else are ignored.
        except ConnectionClosed:
            pass
        for future in self.pending.values():  # the connection is gone: fail every waiter
            if not future.done():
                future.set_exception(ConnectionError("the gateway closed the WebSocket"))

    async def request(self, frame: dict) -> dict:
        """Send `frame` with a fresh id; return the frame answering it (of any type)."""
        self.next_id += 1
        frame = {**frame, "id": self.next_id}
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        await self.ws.send(json.dumps(frame))
        return await asyncio.wait_for(future, REPLY_TIMEOUT)

    async def rpc(self, method: str, params: dict | None = None) -> dict:
        """`rpc` -> the `rpc_response` (with `result` or `error`), or an `error` frame."""
        return await self.request({"type": "rpc", "method": method, "params": params or {}})

    async def chat(self, content: str, agent: str, thread_id: str | None = None, **extra) -> dict:
        """`chat_message` -> the `run` frame; an `error` frame raises ChatRefused."""
        frame = {"type": "chat_message", "content": content, "agent": agent, **extra}
        if thread_id:
            frame["thread_id"] = thread_id
        answer = await self.request(frame)
        if answer.get("type") != "run":
            raise ChatRefused(answer)
        return answer

    async def next_event(self, run_id: str, timeout: float) -> dict:
        return await asyncio.wait_for(self.runs[run_id].get(), timeout)

    async def until_end(self, run_id: str, timeout: float, frames: list | None = None) -> list[dict]:
        """The run's `agent_event` frames (appended to `frames`) up to RUN_FINISHED
        or RUN_ERROR; raises TimeoutError if it does not end within `timeout`."""
        frames = [] if frames is None else frames
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.runs[run_id].get()
                frames.append(frame)
                if frame["event"].get("type") in ("RUN_FINISHED", "RUN_ERROR"):
                    return frames

    async def until_content(self, run_id: str, frames: list) -> None:
        """Wait for the run's first TEXT_MESSAGE_CONTENT (the worker is mid-run)."""
        async with asyncio.timeout(REPLY_TIMEOUT):
            while True:
                frame = await self.runs[run_id].get()
                frames.append(frame)
                if frame["event"].get("type") == "TEXT_MESSAGE_CONTENT":
                    return
                if frame["event"].get("type") in ("RUN_FINISHED", "RUN_ERROR"):
                    raise RuntimeError(f"the run ended before any content: {frame['event']}")


class WorkerProcess:
    """worker.py as a subprocess; its log is kept, and shown when a check fails."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.pump = asyncio.create_task(self.read_log())

    @classmethod
    async def start(cls, args: argparse.Namespace) -> WorkerProcess:
        command = [sys.executable, str(WORKER), "--bridge", args.bridge, "--agent", args.worker_agent,
                   "--name", args.worker_name, "--delay", str(WORD_DELAY), "--max-runs", "4"]
        if args.key:
            command += ["--key", args.key]
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        return cls(proc)

    async def read_log(self) -> None:
        async for line in self.proc.stdout:
            self.lines.append(line.decode(errors="replace").rstrip())

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    async def stop(self) -> None:
        """SIGTERM (the worker detaches and exits), then SIGKILL after 5 s."""
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        try:
            await asyncio.wait_for(self.pump, 2)
        except asyncio.TimeoutError:
            self.pump.cancel()


def our_worker(status: dict, name: str) -> dict | None:
    """Our worker in a get_status result, by its (unique) worker name."""
    workers = (status.get("result") or {}).get("workers") or []
    return next((w for w in workers if w.get("name") == name), None)


async def wait_attached(gw: Gateway, worker: WorkerProcess, name: str) -> dict | None:
    deadline = time.monotonic() + ATTACH_TIMEOUT
    while time.monotonic() < deadline and worker.proc.returncode is None:
        found = our_worker(await gw.rpc("get_status"), name)
        if found:
            return found
        await asyncio.sleep(0.2)
    return None


def check_text_run(checks: Checks, label: str, run: dict, frames: list[dict], reply: str) -> None:
    """A whole, well-ordered run whose one text message is `reply`, word by word."""
    events = [f["event"] for f in frames]
    types = [e.get("type") for e in events]
    contents = [e for e in events if e.get("type") == "TEXT_MESSAGE_CONTENT"]
    text = "".join(e.get("delta", "") for e in contents)
    words = len(re.findall(r"\S+", reply))
    shape = (types[:2] == ["RUN_STARTED", "TEXT_MESSAGE_START"] and types[-2:] == ["TEXT_MESSAGE_END", "RUN_FINISHED"]
             and set(types[2:-2]) == {"TEXT_MESSAGE_CONTENT"})
    checks.check(f"{label}: RUN_STARTED, TEXT_MESSAGE_START, CONTENT x{words}, END, RUN_FINISHED",
                 shape and len(contents) == words, f"got {types}")
    started = events[0] if events else {}
    checks.check(f"{label}: RUN_STARTED names the run's thread and run ids",
                 (started.get("threadId"), started.get("runId")) == (run["thread_id"], run["run_id"]),
                 f"run frame {run}, RUN_STARTED {started}")
    checks.check(f"{label}: seq runs 1..{len(frames)}",
                 [f.get("seq") for f in frames] == list(range(1, len(frames) + 1)),
                 f"got {[f.get('seq') for f in frames]}")
    checks.check(f"{label}: the text is {reply!r}", text == reply, f"got {text!r}")


async def run_checks(args: argparse.Namespace, checks: Checks) -> None:
    url = f"{args.ws}?token={args.token}" if args.token else args.ws
    async with connect(url, open_timeout=CONNECT_TIMEOUT, close_timeout=2) as ws:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            while json.loads(await ws.recv()).get("type") != "connected":
                pass
        checks.check("websocket connected", True)
        gw = Gateway(ws)
        worker = await WorkerProcess.start(args)
        try:
            await checks_with_worker(args, checks, gw, worker)
        except Exception as err:  # a request that timed out, the WebSocket closing...
            checks.check("check ran to completion", False, f"{type(err).__name__}: {err}")
        finally:
            await worker.stop()
            gw.reader.cancel()
            if checks.failed:
                print(f"      worker.py log (exit status {worker.proc.returncode}), last 25 lines:")
                for line in worker.lines[-25:]:
                    print(f"      | {line}")


async def checks_with_worker(args: argparse.Namespace, checks: Checks, gw: Gateway, worker: WorkerProcess) -> None:
    agent = args.agent
    attached = await wait_attached(gw, worker, args.worker_name)
    why = (f"worker.py exited with status {worker.proc.returncode} before attaching"
           if worker.proc.returncode is not None else f"not listed within {ATTACH_TIMEOUT:g} s")
    if not checks.check(f"worker {args.worker_name} attached (listed by get_status)", attached is not None, why):
        return
    print(f"      worker {attached.get('id')}: agents {attached.get('agents')}, "
          f"methods {attached.get('methods')}", flush=True)

    # (a) one run, word by word.
    text = f"hello from check {secrets.token_hex(2)}"
    try:
        run = await gw.chat(text, agent)
        frames = await gw.until_end(run["run_id"], RUN_TIMEOUT)
        check_text_run(checks, "(a) first message", run, frames, expected_reply(text, 1))
    except Exception as err:
        checks.check("(a) first message: a run that finishes", False, f"{type(err).__name__}: {err}")
        run = None

    # (b) the same thread again, each message sent as soon as the previous run
    # finished (as a chat UI would): the worker counts 2, 3, 4 user messages.
    if run:
        busy: list[dict] = []  # thread_busy answers to those immediate follow-ups
        for n in (2, 3, 4):
            label = f"(b) message {n} on the same thread"
            text = f"and again, {n}"
            try:
                try:
                    next_run = await gw.chat(text, agent, thread_id=run["thread_id"])
                except ChatRefused as refused:
                    if refused.frame.get("code") != "thread_busy":
                        raise
                    # The thread is still held by the run that just finished;
                    # wait for it (enqueue), so the history is still checked.
                    busy.append(refused.frame)
                    next_run = await gw.chat(text, agent, thread_id=run["thread_id"], multitask="enqueue")
                frames = await gw.until_end(next_run["run_id"], RUN_TIMEOUT)
                reply = expected_reply(text, n)
                got = "".join(f["event"].get("delta", "") for f in frames)
                checks.check(f"{label} says 'message {n}' (the history reached the worker)",
                             next_run.get("thread_id") == run["thread_id"] and got == reply
                             and frames[-1]["event"].get("type") == "RUN_FINISHED",
                             f"thread {next_run.get('thread_id')}, text {got!r}, last {frames[-1]['event']}")
            except Exception as err:
                checks.check(f"{label}: a run that finishes", False, f"{type(err).__name__}: {err}")
        checks.check("(b) a chat_message right after RUN_FINISHED is accepted (no thread_busy)", not busy,
                     f"{len(busy)} of 3 answered {json.dumps(busy[0]) if busy else ''}")
    else:
        checks.check("(b) messages on the same thread", False, "skipped: (a) did not start a run")

    # (c) a method by name, with good and with bad params.
    answer = await gw.rpc("add", {"a": 2, "b": 3})
    checks.check("(c) rpc add {a:2, b:3} -> 5", answer.get("type") == "rpc_response" and answer.get("result") == 5
                 and "error" not in answer, f"got {answer}")
    answer = await gw.rpc("add", {"a": "two"})
    checks.check("(c) rpc add {a:'two'} -> error invalid_params",
                 (answer.get("error") or {}).get("code") == "invalid_params", f"got {answer}")

    # (d) a method through execute_command.
    answer = await gw.rpc("execute_command", {"command": "reverse", "args": {"text": "abc"}})
    checks.check("(d) rpc execute_command reverse {text:'abc'} -> 'cba'",
                 answer.get("result") == "cba" and "error" not in answer, f"got {answer}")

    # (d2) a worker method learns who called it.
    answer = await gw.rpc("whoami", {})
    expected = {"user_id": args.expect_user, "roles": args.expect_roles}
    checks.check(f"(d2) rpc whoami -> the caller {json.dumps(expected)}",
                 answer.get("result") == expected, f"got {answer}")

    # (e) two runs at once, on two threads.
    try:
        runs = await asyncio.gather(gw.chat("one " * 20, agent), gw.chat("two " * 20, agent))
        ends = await asyncio.gather(*(gw.until_end(r["run_id"], RUN_TIMEOUT) for r in runs))
        finished = [f[-1]["event"].get("type") == "RUN_FINISHED" for f in ends]
        # Interleaved: some word of one run arrived between two words of the other.
        a, b = ([f["arrival"] for f in frames if f["event"].get("type") == "TEXT_MESSAGE_CONTENT"]
                for frames in ends)
        overlap = bool(a and b) and (any(min(b) < n < max(b) for n in a) or any(min(a) < n < max(a) for n in b))
        checks.check("(e) two concurrent runs both finish, interleaved", all(finished) and overlap,
                     f"finished {finished}, overlap {overlap}")
    except Exception as err:
        checks.check("(e) two concurrent runs both finish", False, f"{type(err).__name__}: {err}")

    # (f) interrupt_stream in the middle of a long run.
    frames: list[dict] = []
    try:
        run = await gw.chat(LONG_TEXT, agent)
        await gw.until_content(run["run_id"], frames)
        asked = time.monotonic()
        await gw.ws.send(json.dumps({"type": "interrupt_stream", "run_id": run["run_id"]}))
        await gw.until_end(run["run_id"], CANCEL_WITHIN, frames)
        took = time.monotonic() - asked
        last = frames[-1]["event"]
        checks.check(f"(f) interrupt_stream ends the run with RUN_ERROR cancelled within {CANCEL_WITHIN:g} s",
                     last.get("type") == "RUN_ERROR" and last.get("code") == "cancelled",
                     f"ended with {last} after {took:.2f} s")
        types = [f["event"].get("type") for f in frames]
        checks.check("(f) the open message is closed before RUN_ERROR", types[-2:] == ["TEXT_MESSAGE_END", "RUN_ERROR"],
                     f"got {types[-3:]}")
        stopped = f"run {run['run_id']}: stopped after"
        deadline = time.monotonic() + CANCEL_WITHIN
        while not worker.said(stopped) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        checks.check("(f) the worker got cancel_run and stopped the run", worker.said(stopped),
                     f"worker.py did not log {stopped!r} within {CANCEL_WITHIN:g} s")
    except Exception as err:
        checks.check("(f) interrupt_stream ends the run as cancelled", False,
                     f"{type(err).__name__}: {err}; last events {[f['event'] for f in frames[-3:]]}")

    # (g) the worker dies mid-run.
    frames = []
    try:
        run = await gw.chat(LONG_TEXT, agent)
        await gw.until_content(run["run_id"], frames)
        worker.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await gw.until_end(run["run_id"], LOST_WITHIN, frames)
        took = time.monotonic() - killed
        last = frames[-1]["event"]
        checks.check(f"(g) SIGKILL of the worker ends its run with RUN_ERROR agent_lost within {LOST_WITHIN:g} s",
                     last.get("type") == "RUN_ERROR" and last.get("code") == "agent_lost",
                     f"ended with {last} after {took:.2f} s")
        status = await gw.rpc("get_status")
        checks.check("(g) get_status no longer lists the worker", our_worker(status, args.worker_name) is None
                     and "result" in status, f"got {status}")
    except Exception as err:
        checks.check("(g) SIGKILL of the worker ends its run as agent_lost", False,
                     f"{type(err).__name__}: {err}; last events {[f['event'] for f in frames[-3:]]}")

    checks.check("no unexpected error frames", not gw.stray, f"{gw.stray[:3]}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Check worker.py against a running Switchboard.")
    parser.add_argument("--ws", required=True, help="gateway WebSocket URL, ws://HOST:PORT/ws/connect")
    parser.add_argument("--bridge", required=True, help="agent bridge address, HOST:PORT")
    parser.add_argument("--key", default="", help="agent bridge API key, if it needs one")
    parser.add_argument("--token", default="",
                        help="client token for the WebSocket; get_status lists workers only to the admin role")
    parser.add_argument("--expect-user", default="anonymous",
                        help="the user id the worker should see as the caller (default: %(default)s)")
    parser.add_argument("--expect-roles", default=[], type=lambda s: [r for r in s.split(",") if r],
                        help="the caller's roles, comma-separated (default: none)")
    parser.add_argument("--agent", default="py-writer", help="agent to chat with (default: %(default)s)")
    parser.add_argument("--worker-agent", default="",
                        help="agent the worker registers (default: --agent; set it elsewhere to see the check fail)")
    parser.add_argument("--worker-name", default=f"py-writer-check-{secrets.token_hex(4)}",
                        help="worker name, to find it in get_status (default: a fresh py-writer-check-<random>)")
    args = parser.parse_args()
    args.worker_agent = args.worker_agent or args.agent
    return args


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
