#!/usr/bin/env python3
"""An agent worker for the Switchboard agent bridge, in Python with grpc.aio.

It dials the bridge's `AgentWorker.Attach` stream, says `hello` (one agent,
two methods), and then serves what the bridge sends:

* `start_run`: the agent `py-writer` answers the last user message of the
  thread, word by word, as one AG-UI text message:
  "You said: <text> (message N of this thread)", where N counts the user
  messages of the history the bridge sent, so the history is visible;
* `cancel_run`: the run's task is cancelled and sends nothing more (the bridge
  closes the run's open message and ends it with RUN_ERROR `cancelled`);
* `call`: the methods `add` ({a, b} -> a + b), `reverse` ({text} -> the text
  reversed) and `whoami` (-> the caller's {user_id, roles}, which every `call`
  carries so that a method can decide who may do what), answered with
  `call_result`.

Every run and every call is an asyncio task, so several runs go on at once (up
to `--max-runs`, which the bridge enforces). A heartbeat goes out every 10 s.
The worker does not reconnect: it exits when the stream ends.

With several agent bridges (SPEC §10: the gateway routes each thread to one
of them), a worker attaches to every one, so that whichever bridge a thread
is on finds it: `--bridge` takes a comma-separated list, and the worker keeps
one attachment (one `Worker` below) per bridge. A bridge that goes away ends
only its attachment; the worker serves the others, and exits when all ended.

    python worker.py --bridge 127.0.0.1:50052
    python worker.py --bridge 10.0.0.1:50052,10.0.0.2:50052

The stubs are generated from the repository's `proto/` at start-up with
`grpc_tools.protoc`, into a temporary directory; nothing is written to the tree.
Exits 0 when the bridge ends the stream or on SIGINT/SIGTERM, 1 on a gRPC error.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.resources
import json
import logging
import re
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType

import grpc
from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
# examples/python-agent/ -> repository root -> proto/
DEFAULT_PROTO_DIR = HERE.parent.parent / "proto"
PROTO_FILE = "switchboard/agent/v1/agent.proto"
STUB_MODULE = "switchboard.agent.v1.agent"

log = logging.getLogger("worker")


def load_stubs(proto_dir: Path) -> tuple[ModuleType, ModuleType]:
    """Generate the agent stubs from `proto_dir` into a temporary directory and
    import them; returns the `agent_pb2` and `agent_pb2_grpc` modules."""
    proto_path = proto_dir / PROTO_FILE
    if not proto_path.is_file():
        sys.exit(f"error: {proto_path} not found (set --proto-dir to the repository's proto/)")
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(prefix="switchboard-stubs-") as out:
        status = protoc.main([
            "grpc_tools.protoc",
            f"--proto_path={proto_dir}",
            f"--proto_path={well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(proto_path),
        ])
        if status != 0:
            sys.exit(f"error: protoc failed on {proto_path} (exit status {status})")
        # Regular packages, so that no installed `switchboard` shadows ours.
        for directory in Path(out).rglob("*"):
            if directory.is_dir():
                (directory / "__init__.py").touch()
        sys.path.insert(0, out)
        try:
            pb2 = importlib.import_module(f"{STUB_MODULE}_pb2")
            pb2_grpc = importlib.import_module(f"{STUB_MODULE}_pb2_grpc")
        finally:
            sys.path.remove(out)
    return pb2, pb2_grpc


# --- The agent -------------------------------------------------------------


def text_of(content) -> str:
    """An AG-UI message's content: a string, or a list of parts like {type: "text", text}."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def reply_to(run_input: dict) -> str:
    """What py-writer says, given the RunAgentInput with the thread's history."""
    messages = [m for m in run_input.get("messages") or [] if isinstance(m, dict)]
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        return "You said nothing (message 0 of this thread)"
    return f"You said: {text_of(users[-1].get('content'))} (message {len(users)} of this thread)"


# --- The methods -----------------------------------------------------------


class CallError(Exception):
    """A method's failure, answered as `call_result.error {code, message}`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


async def method_add(params: dict, caller: dict):
    a, b = params.get("a"), params.get("b")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
        raise CallError("invalid_params", "add needs numbers `a` and `b`")
    return a + b


async def method_reverse(params: dict, caller: dict):
    text = params.get("text")
    if not isinstance(text, str):
        raise CallError("invalid_params", "reverse needs a string `text`")
    return text[::-1]


async def method_whoami(params: dict, caller: dict):
    # Empty user_id: a service called Call directly, not on behalf of a user.
    return caller


METHODS: dict[str, Callable[[dict, dict], Awaitable[object]]] = {
    "add": method_add,
    "reverse": method_reverse,
    "whoami": method_whoami,
}


# --- The worker ------------------------------------------------------------


class Worker:
    """One attachment to the bridge: an outbox feeding the request stream, and
    a task per run and per call."""

    def __init__(self, pb2: ModuleType, args: argparse.Namespace) -> None:
        self.pb2 = pb2
        self.args = args
        # Everything we send goes through this queue; None ends the stream.
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.runs: dict[str, asyncio.Task] = {}  # run_id -> task
        self.tasks: set[asyncio.Task] = set()  # calls in flight (kept referenced)
        self.draining = False

    # Sending. put_nowait never blocks, so a run cannot be cancelled half-way
    # through sending one event.

    def send(self, **message) -> None:
        self.outbox.put_nowait(self.pb2.WorkerMessage(**message))

    def send_event(self, run_id: str, event: dict) -> None:
        data = json.dumps(event, separators=(",", ":")).encode()
        self.send(event=self.pb2.WorkerEvent(run_id=run_id, json=data))

    async def requests(self) -> AsyncIterator:
        """The request stream of Attach: `hello` first, then the outbox."""
        yield self.pb2.WorkerMessage(hello=self.pb2.Hello(
            worker_name=self.args.name,
            agents=[self.args.agent],
            methods=list(METHODS),
            max_concurrent_runs=self.args.max_runs,
        ))
        while (message := await self.outbox.get()) is not None:
            yield message

    def close(self) -> None:
        """End our side of the stream; the bridge then lets the worker go."""
        self.outbox.put_nowait(None)

    # Serving.

    async def serve(self, stub, metadata) -> None:
        call = stub.Attach(self.requests(), metadata=metadata)
        heartbeat = asyncio.create_task(self.heartbeats())
        try:
            async for message in call:
                kind = message.WhichOneof("message")
                if kind == "welcome":
                    log.info("attached as worker %s: agent %s, methods %s, up to %d runs at once",
                             message.welcome.worker_id, self.args.agent,
                             ", ".join(METHODS), self.args.max_runs)
                elif kind == "start_run":
                    self.start_run(message.start_run)
                elif kind == "cancel_run":
                    self.cancel_run(message.cancel_run)
                elif kind == "call":
                    self.spawn(self.answer(message.call))
                elif kind == "drain":
                    # The bridge wants us gone: finish the runs we have, then leave.
                    log.info("drain: finishing %d run(s), then detaching", len(self.runs))
                    self.draining = True
                    if not self.runs:
                        self.close()
                else:
                    log.warning("ignoring an unknown bridge message %r", kind)
            log.info("the bridge ended the stream")
        finally:
            heartbeat.cancel()
            for task in [*self.runs.values(), *self.tasks]:
                task.cancel()

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.args.heartbeat)
            self.send(heartbeat=self.pb2.Heartbeat())
            log.debug("heartbeat (%d run(s) active)", len(self.runs))

    def spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def start_run(self, start) -> None:
        if len(self.runs) >= self.args.max_runs:
            log.warning("run %s: over --max-runs (%d), serving it anyway", start.run_id, self.args.max_runs)
        task = asyncio.create_task(self.run(start))
        self.runs[start.run_id] = task

        def done(_: asyncio.Task) -> None:
            self.runs.pop(start.run_id, None)
            if self.draining and not self.runs:
                self.close()

        task.add_done_callback(done)

    def cancel_run(self, cancel) -> None:
        task = self.runs.get(cancel.run_id)
        if task is None:
            log.info("run %s: cancel_run for a run that already ended (%s)", cancel.run_id, cancel.reason)
            return
        log.info("run %s: cancel_run (%s): stopping", cancel.run_id, cancel.reason or "no reason given")
        task.cancel()

    async def run(self, start) -> None:
        """One run of the agent: RUN_STARTED, one text message word by word, RUN_FINISHED."""
        run_id, thread_id = start.run_id, start.thread_id
        words = 0
        # RUN_STARTED first, so that anything failing after it can be a RUN_ERROR.
        self.send_event(run_id, {"type": "RUN_STARTED", "threadId": thread_id, "runId": run_id})
        try:
            run_input = json.loads(start.input or b"{}")
            reply = reply_to(run_input)
            log.info("run %s on thread %s: %d message(s) of history, replying %d chars",
                     run_id, thread_id, len(run_input.get("messages") or []), len(reply))
            message_id = f"{run_id}-reply"
            self.send_event(run_id, {"type": "TEXT_MESSAGE_START", "messageId": message_id,
                                     "role": "assistant"})
            # Each word with the spaces after it, so the deltas add up to the reply.
            for piece in re.findall(r"\S+\s*", reply):
                self.send_event(run_id, {"type": "TEXT_MESSAGE_CONTENT", "messageId": message_id,
                                         "delta": piece})
                words += 1
                await asyncio.sleep(self.args.delay)
            self.send_event(run_id, {"type": "TEXT_MESSAGE_END", "messageId": message_id})
            self.send_event(run_id, {"type": "RUN_FINISHED", "threadId": thread_id, "runId": run_id})
            log.info("run %s: finished (%d words)", run_id, words)
        except asyncio.CancelledError:
            # Cancelled by cancel_run (or because we are leaving): send nothing
            # more, the bridge ends the run itself.
            log.info("run %s: stopped after %d words", run_id, words)
            raise
        except Exception as err:  # a bug in the agent: the run fails, the worker goes on
            log.exception("run %s failed", run_id)
            self.send_event(run_id, {"type": "RUN_ERROR", "message": str(err), "code": "agent_error"})

    async def answer(self, call) -> None:
        """Answers one `call` with a `call_result`: a JSON result, or an error."""
        result = self.pb2.CallResult(call_id=call.call_id)
        try:
            method = METHODS.get(call.method)
            if method is None:
                raise CallError("unknown_method", f"this worker has no method {call.method!r}")
            params = json.loads(call.params) if call.params else {}
            if not isinstance(params, dict):
                raise CallError("invalid_params", "params must be a JSON object")
            caller = {"user_id": call.user_id, "roles": list(call.roles)}
            value = await method(params, caller)
            result.result = json.dumps(value).encode()
            log.info("call %s: %s(%s) -> %s", call.call_id, call.method, json.dumps(params), json.dumps(value))
        except CallError as err:
            result.error.code, result.error.message = err.code, str(err)
            log.info("call %s: %s failed: %s: %s", call.call_id, call.method, err.code, err)
        except Exception as err:
            result.error.code, result.error.message = "internal", f"{type(err).__name__}: {err}"
            log.exception("call %s: %s raised", call.call_id, call.method)
        self.send(call_result=result)


def grpc_target(url: str) -> str:
    """Accept `host:port` as well as the `grpc://host:port` that `switchboard up` prints."""
    for scheme in ("grpc://", "http://"):
        if url.startswith(scheme):
            return url[len(scheme):]
    return url


async def attach(worker: Worker, pb2_grpc: ModuleType, target: str, metadata) -> int:
    """Serves one bridge until its stream ends; 0 when it ended it, 1 on a gRPC error."""
    log.info("attaching to the bridge at %s", target)
    # Plaintext, as in dev mode on loopback; use grpc.aio.secure_channel() with
    # grpc.ssl_channel_credentials() when the bridge is behind TLS.
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            await worker.serve(pb2_grpc.AgentWorkerStub(channel), metadata)
        except grpc.aio.AioRpcError as err:
            log.error("Attach to %s failed: %s: %s", target, err.code().name, err.details())
            return 1
    return 0


async def main_async(args: argparse.Namespace) -> int:
    pb2, pb2_grpc = load_stubs(args.proto_dir)
    metadata = [("authorization", f"Bearer {args.key}")] if args.key else None
    targets = [grpc_target(url.strip()) for url in args.bridge.split(",") if url.strip()]
    # One attachment per bridge: each has its own stream, runs and calls.
    workers = [Worker(pb2, args) for _ in targets]

    # SIGINT/SIGTERM end our side of every stream: each bridge ends our runs
    # (agent_lost) and then the stream, and we exit 0.
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda s=signum: (
            log.info("%s: detaching", signal.Signals(s).name), [w.close() for w in workers]))

    codes = await asyncio.gather(*(attach(w, pb2_grpc, t, metadata) for w, t in zip(workers, targets)))
    return max(codes, default=0)


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be positive")
        return value
    return parse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A Python agent worker for the Switchboard agent bridge.")
    parser.add_argument("--bridge", default="127.0.0.1:50052",
                        help="agent bridge address, host:port, or a comma-separated list of them: the "
                             "worker attaches to every one (default: %(default)s)")
    parser.add_argument("--key", default="",
                        help="API key, sent as 'authorization: Bearer KEY' (not needed in dev mode)")
    parser.add_argument("--agent", default="py-writer", help="agent name to serve (default: %(default)s)")
    parser.add_argument("--name", default="python-agent-example",
                        help="worker name shown by get_status (default: %(default)s)")
    parser.add_argument("--max-runs", type=positive(int), default=4,
                        help="runs served at once (default: %(default)s)")
    parser.add_argument("--delay", type=float, default=0.03,
                        help="seconds between words (default: %(default)s)")
    parser.add_argument("--heartbeat", type=positive(float), default=10.0,
                        help="seconds between heartbeats (default: %(default)s)")
    parser.add_argument("--proto-dir", type=Path, default=DEFAULT_PROTO_DIR,
                        help="directory holding switchboard/agent/v1/agent.proto (default: the repository's proto/)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log heartbeats too")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-5s %(message)s",
                        stream=sys.stderr)
    if args.verbose:
        log.setLevel(logging.DEBUG)  # our heartbeats, not asyncio's and grpc's debug chatter
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
