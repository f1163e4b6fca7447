// The Socket.IO frontend our users have (SPEC §3.6), unchanged, against the
// real binary: io("ws://host/ws", {transports: ["websocket"]}),
// emit("rpc", {method, params}) and rpc_response typed `status_update` /
// `command_response` / `error`; events of channels published over the HTTP
// API; acks; errors for what the server does not know.
import { test, before, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import { io } from "socket.io-client";
import { Server, connect, closeAll, next, collect, attachWorker, unique, until } from "./helpers.mjs";

let server;
before(async () => {
  server = await new Server().start();
});
afterEach(() => closeAll());
after(async () => {
  await server.close();
});

test("the frontend's get_status: rpc_response with type status_update", async () => {
  // Exactly what that frontend does (seeds/001), with the port of the test server.
  const socket = io(`ws://127.0.0.1:${server.port}/ws`, {
    reconnection: true,
    reconnectionAttempts: 5,
    reconnectionDelay: 1000,
    reconnectionDelayMax: 5000,
    timeout: 20000,
    transports: ["websocket"],
  });
  try {
    const response = new Promise((resolve) => socket.on("rpc_response", resolve));
    socket.on("connect", () => {
      socket.emit("rpc", { method: "get_status", params: {} });
    });
    const r = await Promise.race([response, new Promise((_, rej) => setTimeout(() => rej(new Error("no rpc_response")), 10000))]);
    assert.equal(r.type, "status_update");
    assert.equal(r.data.gateway.ready, true);
    assert.deepEqual(r.data, r.result);
    assert.ok(Array.isArray(r.data.agents) || typeof r.data.agents === "object", JSON.stringify(r.data));
    assert.equal(socket.io.engine.transport.name, "websocket");
  } finally {
    socket.disconnect();
  }
});

test("connected is the first event, with the connection id as the socket's id", async () => {
  const socket = connect(server, "/ws", { transports: ["websocket"] });
  const connected = await next(socket, "connected");
  assert.equal(connected.connection_id, socket.id);
  assert.equal(connected.type, undefined, "server events carry the frame without its type");
  assert.equal(typeof connected.timestamp, "number");
  assert.equal(connected.user_id, null);
});

test("execute_command through an attached worker: rpc_response with type command_response", async () => {
  const worker = await attachWorker(server, { add: ({ a, b }) => a + b });
  try {
    const socket = connect(server, "/ws", { transports: ["websocket"] });
    await next(socket, "connect");
    socket.emit("rpc", { method: "execute_command", params: { command: "add", args: { a: 2, b: 40 } } });
    const r = await next(socket, "rpc_response");
    assert.equal(r.type, "command_response", JSON.stringify(r));
    assert.equal(r.data, 42);
    socket.emit("rpc", { method: "execute_command", params: { command: "nobody-registered-this", args: {} } });
    const e = await next(socket, "rpc_response");
    assert.equal(e.type, "error");
    assert.equal(e.data.code, "unknown_method");
    assert.equal(typeof e.data.message, "string");
  } finally {
    worker.close();
  }
});

test("subscribe, then events published over the HTTP API arrive as `event`, in order", async () => {
  const channel = unique("missions-");
  const socket = connect(server, "/ws", { transports: ["websocket"] });
  const events = collect(socket, channel);
  await next(socket, "connect");
  socket.emit("subscribe", { channel });
  const sub = await next(socket, "subscribed", (s) => s.channel === channel);
  assert.equal(typeof sub.position.epoch, "string");
  for (let i = 1; i <= 5; i++) await server.publish(channel, "mission_update", { n: i });
  await until(() => events.length === 5, 10000, "5 events");
  assert.deepEqual(events.map((e) => e.data.n), [1, 2, 3, 4, 5]);
  assert.deepEqual(events.map((e) => e.event), Array(5).fill("mission_update"));
  const offsets = events.map((e) => e.offset);
  assert.deepEqual(offsets, offsets.map((_, i) => offsets[0] + i));
  socket.emit("unsubscribe", { channel });
  const unsub = await next(socket, "unsubscribed");
  assert.deepEqual([unsub.channel, unsub.reason], [channel, "client"]);
});

test("the root namespace works the same, and a channel name as the argument subscribes", async () => {
  const channel = unique("root-");
  const socket = connect(server, "/", { transports: ["websocket"] });
  await next(socket, "connect");
  socket.emit("subscribe", channel);
  await next(socket, "subscribed", (s) => s.channel === channel);
  const event = next(socket, "event");
  await server.publish(channel, "x", { ok: true });
  const e = await event;
  assert.deepEqual([e.channel, e.event, e.data], [channel, "x", { ok: true }]);
});

test("acks: the reply goes to the callback, with the client's id, instead of being emitted", async () => {
  const channel = unique("acked-");
  const socket = connect(server, "/ws", { transports: ["websocket"] });
  await next(socket, "connect");
  let emitted = 0;
  socket.on("rpc_response", () => emitted++);
  socket.on("subscribed", () => emitted++);
  const status = await socket.timeout(10000).emitWithAck("rpc", { method: "get_status", params: {}, id: "mine-1" });
  assert.equal(status.type, "status_update");
  assert.equal(status.id, "mine-1");
  const sub = await socket.timeout(10000).emitWithAck("subscribe", { channel });
  assert.equal(sub.channel, channel);
  assert.equal(sub.id, undefined);
  const err = await socket.timeout(10000).emitWithAck("subscribe", { channel: "bad channel!" });
  assert.equal(err.code, "invalid_channel");
  // A round trip without an ack, so anything emitted for the acked ones would have come by now.
  socket.emit("ping", {});
  await next(socket, "pong");
  assert.equal(emitted, 0);
});

test("publish from the client, and errors for unknown events and bad fields", async () => {
  const socket = connect(server, "/ws", { transports: ["websocket"] });
  await next(socket, "connect");
  socket.emit("dance", {});
  const unknown = await next(socket, "error");
  assert.equal(unknown.code, "unknown_type");
  socket.emit("subscribe", { channel: 5 });
  const bad = await next(socket, "error");
  assert.equal(bad.code, "invalid_frame");
  assert.match(bad.message, /channel/);
  // Client publishing is off for `missions` (no namespace allows it).
  const refused = await socket.timeout(10000).emitWithAck("publish", { channel: "missions", event: "e", data: {} });
  assert.equal(refused.code, "permission_denied");
  // The connection is still usable.
  const status = await socket.timeout(10000).emitWithAck("rpc", { method: "get_status", params: {} });
  assert.equal(status.type, "status_update");
});

test("an unknown namespace is refused with connect_error", async () => {
  const socket = connect(server, "/nope", { transports: ["websocket"], reconnection: false });
  const err = await next(socket, "connect_error");
  assert.match(err.message, /Invalid namespace/);
});
