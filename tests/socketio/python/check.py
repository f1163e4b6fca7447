"""The python-socketio client against a running `switchboard up` (SPEC §3.6).

What a Python service or script that speaks Socket.IO does: connect to
`/ws` over websocket with `auth.token`, call `get_status` the way the seed
frontend does (`rpc` answered by `rpc_response` with `type: status_update`),
subscribe with an acknowledgement, receive an event published over the HTTP
API, and get a named error for a frame it may not send. Prints
"N passed, M failed" last and exits non-zero on any failure.
"""

import argparse
import json
import queue
import sys
import urllib.request

import socketio

WAIT = 10


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", required=True, help="http://127.0.0.1:PORT of the gateway")
    parser.add_argument("--token", required=True)
    parser.add_argument("--admin-key", required=True)
    args = parser.parse_args()

    results = []

    def check(name, ok, detail=""):
        results.append(ok)
        print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else ': ' + str(detail)}")

    received = {name: queue.Queue() for name in ("connected", "rpc_response", "event", "error")}
    sio = socketio.Client(reconnection=False)
    for name, q in received.items():
        sio.on(name, q.put, namespace="/ws")

    sio.connect(args.http, namespaces=["/ws"], transports=["websocket"], auth={"token": args.token}, wait_timeout=WAIT)
    try:
        connected = received["connected"].get(timeout=WAIT)
        check("connected names the token's user", connected.get("user_id") == "dev", connected)

        sio.emit("rpc", {"method": "get_status", "params": {}}, namespace="/ws")
        status = received["rpc_response"].get(timeout=WAIT)
        check("get_status answers rpc_response of type status_update", status.get("type") == "status_update", status)
        check("the status carries the gateway", "gateway" in (status.get("data") or {}), status)

        subscribed = sio.call("subscribe", {"channel": "missions"}, namespace="/ws", timeout=WAIT)
        check("subscribe is acknowledged with the subscribed frame", subscribed.get("channel") == "missions", subscribed)

        body = json.dumps({"channel": "missions", "type": "launched", "message": {"n": 1}}).encode()
        request = urllib.request.Request(
            f"{args.http}/api/ws/broadcast",
            data=body,
            headers={"Authorization": f"Bearer {args.admin_key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=WAIT) as answer:
            offset = json.load(answer)["offset"]
        event = received["event"].get(timeout=WAIT)
        check(
            "an event published over HTTP arrives with its offset",
            (event.get("channel"), event.get("event"), event.get("data"), event.get("offset"))
            == ("missions", "launched", {"n": 1}, offset),
            event,
        )

        sio.emit("subscribe", {"channel": "bad channel!"}, namespace="/ws")
        error = received["error"].get(timeout=WAIT)
        check("a bad channel name is a named error", error.get("code") == "invalid_channel", error)
    except queue.Empty:
        check("every expected event arrived in time", False, "timed out")
    finally:
        sio.disconnect()

    failed = results.count(False)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
