// Connection states, the heartbeat (ping answered, watchdog), close codes.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { LocalCode, backoff, reconnectsAfter } from "../dist/index.mjs";
import { Server, mint, recordingWebSocket, waitFor, delay, unique, until, makeClient, disconnectAll } from "./helpers.mjs";

let server;
before(async () => {
  // A short heartbeat, so that pings come every second and the watchdog's window is 2 s.
  server = await new Server({ config: `[gateway]\nheartbeat_interval = "1s"\nheartbeat_timeout = "1s"\n` }).start();
});
after(async () => {
  disconnectAll();
  await server?.close();
});

function client(rec, extra = {}) {
  return makeClient(server.url, { WebSocket: rec.WebSocket, minReconnectDelay: 20, maxReconnectDelay: 100, ...extra });
}

test("backoff is full jitter between 0 and min(max, min * 2^attempt); close codes 4500+ do not reconnect", () => {
  for (let attempt = 0; attempt < 12; attempt++) {
    const cap = Math.min(20000, 500 * 2 ** attempt);
    for (let i = 0; i < 200; i++) {
      const d = backoff(attempt, 500, 20000);
      assert.ok(d >= 0 && d < cap, `attempt ${attempt}: ${d} not in [0, ${cap})`);
    }
  }
  // Jittered: not always the same.
  assert.ok(new Set(Array.from({ length: 50 }, () => backoff(5, 500, 20000))).size > 10);
  for (const code of [1001, 1006, 4000, 4002, 4004, 4005, 4499]) assert.equal(reconnectsAfter(code), true, `${code}`);
  for (const code of [4500, 4501, 4502, 4503, 4999]) assert.equal(reconnectsAfter(code), false, `${code}`);
});

test("states go disconnected -> connecting -> connected, ready() resolves, and the server's JSON ping is answered", async (t) => {
  const rec = recordingWebSocket();
  const c = client(rec, { token: mint({ sub: unique("u") }) });
  const states = [];
  c.on("state", (s) => states.push(`${s.previous}->${s.state}`));
  assert.equal(c.state, "disconnected");
  await assert.rejects(c.ready(), { name: "DisconnectedError" });
  c.connect();
  assert.equal(c.state, "connecting");
  const connected = waitFor(c, "connected");
  await c.ready(5000);
  const info = await connected;
  assert.equal(c.state, "connected");
  assert.deepEqual(states, ["disconnected->connecting", "connecting->connected"]);
  // The `connected` frame's heartbeat, in seconds, as the server announced it.
  assert.deepEqual(info.heartbeat, { interval: 1, timeout: 1 });
  assert.match(info.connectionId, /^[0-9a-f-]{36}$/);
  assert.equal(info.reconnects, 0);
  // A JSON ping arrives within the interval, and is answered with a JSON pong.
  await waitFor(c, "ping", () => true, 3000);
  await until(() => rec.sent.some((f) => f.type === "pong"), 2000, "a pong");
  c.disconnect();
  assert.equal(c.state, "disconnected");
  assert.deepEqual(states.slice(-1), ["connected->disconnected"]);
});

test("the watchdog reconnects when no frame arrives within heartbeat.interval + heartbeat.timeout", async (t) => {
  const rec = recordingWebSocket();
  const c = client(rec, { token: mint({ sub: unique("u") }) });
  c.connect();
  const first = await waitFor(c, "connected");
  // A server that is alive (TCP open) but silent: SIGSTOP.
  const startedAt = Date.now();
  await server.pause();
  let reconnecting;
  try {
    reconnecting = await waitFor(c, "connecting", () => true, 6000);
  } finally {
    server.resume();
  }
  const waited = Date.now() - startedAt;
  assert.equal(reconnecting.code, LocalCode.HEARTBEAT_TIMEOUT);
  assert.equal(reconnecting.reconnect, true);
  // Not before the window (2 s, less the up to 1 s since the last ping), not much after it.
  assert.ok(waited >= 900 && waited < 4500, `watchdog fired after ${waited} ms`);
  const second = await waitFor(c, "connected", () => true, 10000);
  assert.notEqual(second.connectionId, first.connectionId);
  assert.equal(second.reconnects, 1);
  c.disconnect();
});

test("an admin disconnect (close 4503, reconnect: false) stops reconnecting", async (t) => {
  const rec = recordingWebSocket();
  const c = client(rec, { token: mint({ sub: unique("u") }) });
  c.connect();
  const info = await waitFor(c, "connected");
  let connecting = 0;
  c.on("connecting", () => connecting++);
  const disconnected = waitFor(c, "disconnected");
  await server.admin("POST", `/api/ws/connections/${info.connectionId}/disconnect`);
  const ctx = await disconnected;
  assert.equal(ctx.code, 4503);
  assert.equal(ctx.reconnect, false);
  assert.equal(c.state, "disconnected");
  // With a 20-100 ms backoff a reconnect would have been tried many times by now.
  await delay(600);
  assert.equal(connecting, 0);
  assert.equal(rec.attempts, 1);
  await assert.rejects(c.ready(), { name: "DisconnectedError" });
});

test("a dropped transport (1006) reconnects with backoff until the server is back", async (t) => {
  const rec = recordingWebSocket();
  const c = client(rec, { token: mint({ sub: unique("u") }) });
  c.connect();
  await waitFor(c, "connected");
  rec.shut = true;
  const attempts = rec.attempts;
  const lost = waitFor(c, "connecting");
  rec.sockets.at(-1).terminate();
  const ctx = await lost;
  assert.equal(ctx.code, 1006);
  // It keeps trying while the server cannot be reached.
  await waitFor(c, "connecting", () => rec.attempts >= attempts + 3, 5000);
  assert.equal(c.state, "connecting");
  rec.shut = false;
  const back = await waitFor(c, "connected", () => true, 5000);
  assert.equal(back.reconnects, 1);
  c.disconnect();
});
