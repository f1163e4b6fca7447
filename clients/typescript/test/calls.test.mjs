// publish and rpc: replies matched by id, errors rejected, timeouts.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { RpcError, SwitchboardError, TimeoutError, DisconnectedError } from "../dist/index.mjs";
import { Server, mint, recordingWebSocket, waitFor, unique, makeClient, disconnectAll } from "./helpers.mjs";

let server;
before(async () => {
  server = await new Server().start();
});
after(async () => {
  disconnectAll();
  await server?.close();
});

function connected(extra = {}) {
  const rec = recordingWebSocket();
  const c = makeClient(server.url, { WebSocket: rec.WebSocket, token: mint({ sub: unique("u") }), minReconnectDelay: 20, maxReconnectDelay: 100, ...extra });
  c.connect();
  return { c, rec };
}

test("publish resolves with the offset and event id; a namespace that refuses client publishing rejects with permission_denied", async (t) => {
  const { c } = connected();
  const channel = unique("chat:");
  const sub = c.newSubscription(channel);
  sub.subscribe();
  // Calls made before the connection is up wait for it.
  const p1 = c.publish(channel, "said", { text: "one" });
  const p2 = c.publish(channel, "said", { text: "two" });
  const [a, b] = await Promise.all([p1, p2]);
  // The server stores concurrent publishes of one connection in either order.
  assert.deepEqual([a.channel, [a.offset, b.offset].sort()], [channel, [1, 2]]);
  assert.match(a.eventId, /^[0-9a-f-]{36}$/);
  assert.notEqual(a.eventId, b.eventId);
  // Awaited one after the other, they are stored in order.
  const delivered = waitFor(sub, "event", (e) => e.offset === 3);
  const third = await c.publish(channel, "said", { text: "three" });
  assert.equal(third.offset, 3);
  const e = await delivered;
  assert.deepEqual(e.data, { text: "three" });
  assert.equal(e.id, third.eventId);
  await assert.rejects(c.publish("missions", "x", {}), (err) => err instanceof SwitchboardError && err.code === "permission_denied");
  c.disconnect();
});

test("rpc resolves with the result, rejects with an RpcError for an error answer, and matches replies by id", async (t) => {
  const { c, rec } = connected();
  await c.ready(5000);
  const [status, other] = await Promise.all([c.rpc("get_status"), c.rpc("get_status", {})]);
  assert.equal(status.bridge, "ok");
  assert.equal(other.gateway.ready, true);
  const ids = rec.sent.filter((f) => f.type === "rpc").map((f) => f.id);
  assert.equal(new Set(ids).size, ids.length, "every rpc has its own id");
  await assert.rejects(c.rpc("no_such_method"), (err) => err instanceof RpcError && err.code === "unknown_method");
  c.disconnect();
});

test("rpc rejects with a TimeoutError when no answer comes in time; the late answer is ignored and the connection goes on", async (t) => {
  const { c } = connected();
  await c.ready(5000);
  const info = c.connection;
  // The server stops answering (SIGSTOP) while the connection stays open.
  await server.pause();
  let timedOut;
  try {
    const startedAt = Date.now();
    timedOut = await c.rpc("get_status", {}, { timeout: 300 }).then(
      () => null,
      (e) => ({ e, after: Date.now() - startedAt }),
    );
  } finally {
    server.resume();
  }
  assert.ok(timedOut, "the rpc must not resolve");
  assert.ok(timedOut.e instanceof TimeoutError, `${timedOut.e}`);
  assert.ok(timedOut.after >= 290 && timedOut.after < 2000, `after ${timedOut.after} ms`);
  // The server answers the first call once it runs again; the next call gets its own answer.
  const status = await c.rpc("get_status", {}, { timeout: 5000 });
  assert.equal(status.bridge, "ok");
  assert.equal(c.connection.connectionId, info.connectionId);
  c.disconnect();
});

test("a call in flight when the connection drops rejects with a DisconnectedError; a call on a disconnected client rejects at once", async (t) => {
  const { c, rec } = connected();
  await c.ready(5000);
  await server.pause();
  try {
    const call = c.rpc("get_status", {}, { timeout: 5000 });
    rec.sockets.at(-1).terminate();
    await assert.rejects(call, DisconnectedError);
  } finally {
    server.resume();
  }
  await waitFor(c, "connected", () => true, 10000);
  c.disconnect();
  await assert.rejects(c.rpc("get_status"), DisconnectedError);
});
