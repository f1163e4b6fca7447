#!/usr/bin/env python3
"""Publish `mission_updated` events to a Switchboard event bus over gRPC.

The Python stubs are generated from the repository's `proto/` directory at run
time with `grpc_tools.protoc`, into a temporary directory that is removed
again once they are imported, so no generated code ever lands in the tree.

Examples:

    # Five events, one `Publish` call each.
    python producer.py --url 127.0.0.1:50051 --channel missions --count 5

    # The same over one bidirectional `PublishStream` call.
    python producer.py --url 127.0.0.1:50051 --channel missions --count 5 --stream

    # Idempotent publishing: run it twice and the second run stores nothing
    # and answers `duplicate=true` with the first run's positions.
    python producer.py --url 127.0.0.1:50051 --count 1 --idempotency-key order-42

Exits 0 when every event was published, 1 on any gRPC error (the status code
and message are printed to stderr), 2 on bad command-line arguments.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.resources
import json
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType

import grpc
from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
# examples/python-producer/ -> repository root -> proto/
DEFAULT_PROTO_DIR = HERE.parent.parent / "proto"
PROTO_FILE = "switchboard/eventbus/v1/eventbus.proto"
STUB_MODULE = "switchboard.eventbus.v1.eventbus"

# Statuses cycled through by mission id, so that the data varies a little.
STATUSES = ("planned", "launched", "in_orbit", "landed")


def load_stubs(proto_dir: Path) -> tuple[ModuleType, ModuleType]:
    """Generate the eventbus stubs from `proto_dir` and import them.

    Returns the `eventbus_pb2` (messages) and `eventbus_pb2_grpc` (service
    stub) modules. The generated files live in a temporary directory only as
    long as it takes to import them: the modules are fully loaded at import,
    so nothing needs them on disk afterwards.
    """
    proto_path = proto_dir / PROTO_FILE
    if not proto_path.is_file():
        sys.exit(f"error: {proto_path} not found (set --proto-dir to the repository's proto/)")

    # protoc's own include directory, for google/protobuf/*.proto imports.
    well_known = importlib.resources.files("grpc_tools") / "_proto"

    with tempfile.TemporaryDirectory(prefix="switchboard-stubs-") as out:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"--proto_path={proto_dir}",
                f"--proto_path={well_known}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                str(proto_path),
            ]
        )
        if status != 0:
            sys.exit(f"error: protoc failed on {proto_path} (exit status {status})")

        # Make every generated directory a regular package, so that an
        # unrelated `switchboard` distribution installed in site-packages
        # cannot shadow ours.
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


def build_requests(pb2: ModuleType, args: argparse.Namespace) -> list:
    """One `PublishRequest` per mission id, with a UTF-8 JSON payload."""
    requests = []
    for mission_id in range(args.first_id, args.first_id + args.count):
        data = {"mission_id": mission_id, "status": STATUSES[mission_id % len(STATUSES)]}
        requests.append(
            pb2.PublishRequest(
                channel=args.channel,
                event=args.event,
                data=json.dumps(data).encode("utf-8"),
                # One key per event, derived from the mission id: re-running
                # the same command publishes nothing new.
                idempotency_key=(
                    f"{args.idempotency_key}-{mission_id}" if args.idempotency_key else ""
                ),
            )
        )
    return requests


def publish_unary(stub, requests: list, metadata, timeout: float) -> Iterator[tuple]:
    """`Publish`: one call per event, each answered once the event is stored.

    Raises `grpc.RpcError` on the first failed call.
    """
    for request in requests:
        yield request, stub.Publish(request, metadata=metadata, timeout=timeout)


def publish_stream(stub, requests: list, metadata, timeout: float) -> Iterator[tuple]:
    """`PublishStream`: all events on one call, one response per request, in order.

    A rejected item comes back with `error` set and the stream goes on; a
    failure of the whole call raises `grpc.RpcError`.
    """
    responses = stub.PublishStream(iter(requests), metadata=metadata, timeout=timeout)
    answered = 0
    for request, response in zip(requests, responses):
        answered += 1
        yield request, response
    if answered != len(requests):
        raise RuntimeError(f"PublishStream answered {answered} of {len(requests)} requests")


def report(request, response, as_json: bool) -> bool:
    """Print one result line; return False when the item failed."""
    data = json.loads(request.data)
    failed = response.HasField("error")
    if as_json:
        line = {
            "channel": request.channel,
            "event": request.event,
            "data": data,
            "idempotency_key": request.idempotency_key,
        }
        if failed:
            line["error"] = {"code": response.error.code, "message": response.error.message}
        else:
            line.update(
                event_id=response.event_id,
                offset=response.offset,
                epoch=response.epoch,
                duplicate=response.duplicate,
            )
        print(json.dumps(line), flush=True)
    elif failed:
        print(
            f"mission {data['mission_id']}: error {response.error.code}: {response.error.message}",
            file=sys.stderr,
        )
    else:
        print(
            f"mission {data['mission_id']}: offset={response.offset} epoch={response.epoch} "
            f"event_id={response.event_id} duplicate={str(response.duplicate).lower()}",
            flush=True,
        )
    return not failed


def grpc_target(url: str) -> str:
    """Accept `host:port` as well as the `grpc://host:port` that `switchboard up` prints."""
    for scheme in ("grpc://", "http://"):
        if url.startswith(scheme):
            return url[len(scheme):]
    return url


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Publish mission_updated events to a Switchboard event bus.",
    )
    parser.add_argument("--url", default="127.0.0.1:50051",
                        help="event bus address, host:port (default: %(default)s)")
    parser.add_argument("--channel", default="missions", help="channel (default: %(default)s)")
    parser.add_argument("--event", default="mission_updated",
                        help="event name (default: %(default)s)")
    parser.add_argument("--count", type=positive_int, default=5,
                        help="number of events (default: %(default)s)")
    parser.add_argument("--first-id", type=int, default=1,
                        help="mission_id of the first event (default: %(default)s)")
    parser.add_argument("--stream", action="store_true",
                        help="publish over one PublishStream call instead of one Publish per event")
    parser.add_argument("--idempotency-key", metavar="KEY", default="",
                        help="publish event N with idempotency key KEY-N; a repeat within "
                             "5 minutes is answered duplicate=true and stores nothing")
    parser.add_argument("--key", default="",
                        help="API key, sent as 'authorization: Bearer KEY' (not needed in dev mode)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="deadline of each call in seconds (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per event instead of a text line")
    parser.add_argument("--proto-dir", type=Path, default=DEFAULT_PROTO_DIR,
                        help="directory holding switchboard/eventbus/v1/eventbus.proto "
                             "(default: the repository's proto/)")
    return parser.parse_args(argv)


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    pb2, pb2_grpc = load_stubs(args.proto_dir)

    metadata = [("authorization", f"Bearer {args.key}")] if args.key else None
    requests = build_requests(pb2, args)
    method = "PublishStream" if args.stream else "Publish"
    publish = publish_stream if args.stream else publish_unary

    # Plaintext, as in dev mode on loopback; use grpc.secure_channel() with
    # grpc.ssl_channel_credentials() when the bus is behind TLS.
    with grpc.insecure_channel(grpc_target(args.url)) as channel:
        stub = pb2_grpc.EventBusStub(channel)
        failed = 0
        try:
            for request, response in publish(stub, requests, metadata, args.timeout):
                if not report(request, response, args.json):
                    failed += 1
        except grpc.RpcError as err:
            # A grpc.Call: code() is a grpc.StatusCode such as INVALID_ARGUMENT.
            print(f"error: {method} failed: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1

    if failed:
        print(f"error: {failed} of {len(requests)} events were rejected", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
