// Engine.IO's transports (SPEC §3.6): the default polling transport, which
// upgrades to a WebSocket, and polling alone; and the slow-consumer rule of
// SPEC §6 on a Socket.IO connection: cut off when its queue overflows, while
// a fast one on the same channel gets everything.
import { test, before, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import { Server, connect, closeAll, next, collect, unique, until } from "./helpers.mjs";

// A small outbound queue, so that a stalled reader overflows it soon.
const QUEUE = 64 * 1024;
let server;
before(async () => {
  server = await new Server({ config: `[limits]\noutbound_queue_bytes = ${QUEUE}\n` }).start();
});
afterEach(() => closeAll());
after(async () => {
  await server.close();
});

test("the default transport polls first, then upgrades to websocket, and carries frames both ways", async () => {
  const channel = unique("upgrade-");
  const socket = connect(server, "/ws");
  let first;
  socket.io.on("open", () => {
    first = socket.io.engine.transport.name;
  });
  const events = collect(socket, channel);
  await next(socket, "connect");
  assert.equal(first, "polling");
  const sub = await socket.timeout(10000).emitWithAck("subscribe", { channel });
  assert.equal(sub.channel, channel);
  await until(() => socket.io.engine.transport.name === "websocket", 10000, "the upgrade to websocket");
  const status = await socket.timeout(10000).emitWithAck("rpc", { method: "get_status", params: {} });
  assert.equal(status.type, "status_update");
  for (let i = 1; i <= 3; i++) await server.publish(channel, "e", { n: i });
  await until(() => events.length === 3, 10000, "3 events after the upgrade");
  assert.deepEqual(events.map((e) => e.data.n), [1, 2, 3]);
});

test("polling alone: connect, subscribe, events, acks", async () => {
  const channel = unique("polling-");
  const socket = connect(server, "/", { transports: ["polling"] });
  const events = collect(socket, channel);
  await next(socket, "connect");
  const sub = await socket.timeout(10000).emitWithAck("subscribe", { channel });
  assert.equal(sub.channel, channel);
  for (let i = 1; i <= 20; i++) await server.publish(channel, "e", { n: i });
  await until(() => events.length === 20, 10000, "20 events over polling");
  assert.deepEqual(events.map((e) => e.data.n), Array.from({ length: 20 }, (_, i) => i + 1));
  assert.equal(socket.io.engine.transport.name, "polling");
  const status = await socket.timeout(10000).emitWithAck("rpc", { method: "get_status", params: {} });
  assert.equal(status.type, "status_update");
});

test("a slow Socket.IO consumer is cut off with 4002 while a fast one gets everything", async () => {
  const channel = unique("slow-");
  const fast = connect(server, "/ws", { transports: ["websocket"] });
  const slow = connect(server, "/ws", { transports: ["websocket"], reconnection: false });
  const fastEvents = collect(fast, channel);
  const slowEvents = collect(slow, channel);
  const farewells = [];
  slow.on("disconnect_reason", (reason) => farewells.push(reason));
  await Promise.all([next(fast, "connect"), next(slow, "connect")]);
  await fast.timeout(10000).emitWithAck("subscribe", { channel });
  await slow.timeout(10000).emitWithAck("subscribe", { channel });
  const slowId = slow.id;
  // The slow client stops reading its socket: the kernel's buffers fill, then its queue.
  slow.io.engine.transport.ws._socket.pause();
  const N = 150;
  const pad = "x".repeat(48 * 1024);
  for (let i = 1; i <= N; i++) await server.publish(channel, "big", { n: i, pad });
  await until(() => fastEvents.length === N, 30000, `the fast consumer's ${N} events`);
  assert.deepEqual(fastEvents.map((e) => e.data.n), Array.from({ length: N }, (_, i) => i + 1));
  // The slow one left the channel at once, on the server's side.
  let info;
  for (let i = 0; i < 200; i++) {
    info = await server.admin("GET", `/api/ws/channels/${encodeURIComponent(channel)}`);
    if (!info.connection_ids.includes(slowId)) break;
    await new Promise((r) => setTimeout(r, 25));
  }
  assert.ok(!info.connection_ids.includes(slowId), "the slow consumer is forgotten");
  assert.ok(info.connection_ids.includes(fast.id));
  slow.io.engine.transport.ws._socket.resume();
  await until(() => farewells.length >= 1, 15000, "the slow client's disconnect_reason");
  assert.ok(slowEvents.length < N, `the slow client got ${slowEvents.length} of ${N}`);
  const bye = farewells[0];
  assert.deepEqual(bye, { code: 4002, reason: "slow consumer", reconnect: true });
});
