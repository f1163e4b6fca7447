// Tokens: getToken() on connect, `refresh` before `exp`, and the
// UnauthorizedError (a refused token, close 4500) that stops reconnecting.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { UnauthorizedError } from "../dist/index.mjs";
import { Server, mint, recordingWebSocket, waitFor, unique, delay, makeClient, disconnectAll } from "./helpers.mjs";

let server;
before(async () => {
  // Anonymous connections refused (a connection must authorize within 1 s),
  // and an expired token's connection closed 1 s after its `exp` (4005).
  server = await new Server({
    env: { SWITCHBOARD_AUTH__ANONYMOUS: "false", SWITCHBOARD_AUTH__EXPIRY_GRACE: "1s", SWITCHBOARD_AUTH__AUTHORIZE_TIMEOUT: "1s" },
  }).start();
});
after(async () => {
  disconnectAll();
  await server?.close();
});

test("getToken() is called on connect and again before exp: the token is refreshed on the same connection, past exp + grace", async (t) => {
  const rec = recordingWebSocket();
  const user = unique("u");
  let calls = 0;
  const c = makeClient(server.url, {
    WebSocket: rec.WebSocket,
    // Tokens that live 3 s: refreshed halfway through.
    getToken: async () => {
      calls++;
      return mint({ sub: user, ttl: 3 });
    },
    minReconnectDelay: 20,
    maxReconnectDelay: 100,
  });
  let disconnects = 0;
  c.on("connecting", () => disconnects++);
  c.connect();
  const info = await waitFor(c, "connected");
  assert.equal(calls, 1);
  assert.equal(info.userId, user);
  const firstExp = info.expiresAt;
  assert.ok(firstExp > Date.now() / 1000);
  // Two refreshes: the second is past the first token's exp + the 1 s grace,
  // when the server would have closed the connection with 4005.
  const r1 = await waitFor(c, "refreshed", () => true, 5000);
  const r2 = await waitFor(c, "refreshed", () => true, 5000);
  assert.ok(r1.expiresAt >= firstExp && r2.expiresAt >= r1.expiresAt);
  while (Date.now() / 1000 < firstExp + 1.5) await waitFor(c, "refreshed", () => true, 5000);
  assert.ok(calls >= 3);
  const refreshes = rec.sent.filter((f) => f.type === "refresh");
  assert.ok(refreshes.length >= 2 && refreshes.every((f) => typeof f.token === "string" && typeof f.id === "number"));
  // Still the same connection, and usable.
  assert.equal(c.connection.connectionId, info.connectionId);
  assert.equal(disconnects, 1, "only the first connect");
  const status = await c.rpc("get_status");
  assert.equal(status.gateway.ready, true);
  c.disconnect();
});

test("without getToken, an expired token's connection is closed (4005) and the reconnect is refused: UnauthorizedError, no more attempts", async (t) => {
  const rec = recordingWebSocket();
  const c = makeClient(server.url, { WebSocket: rec.WebSocket, token: mint({ sub: unique("u"), ttl: 1 }), minReconnectDelay: 20, maxReconnectDelay: 50 });
  c.connect();
  await waitFor(c, "connected");
  const closed = await waitFor(c, "connecting", () => true, 6000);
  assert.equal(closed.code, 4005);
  const end = await waitFor(c, "disconnected", () => true, 5000);
  assert.ok(end.error instanceof UnauthorizedError, `${end.error}`);
  assert.equal(end.reconnect, false);
  const attempts = rec.attempts;
  await delay(300);
  assert.equal(rec.attempts, attempts);
});

test("a refused token rejects ready() with an UnauthorizedError and stops reconnecting", async (t) => {
  const rec = recordingWebSocket();
  const c = makeClient(server.url, { WebSocket: rec.WebSocket, token: mint({ sub: "mallory" }, "not-the-secret-not-the-secret-not-the-secret"), minReconnectDelay: 20, maxReconnectDelay: 50 });
  c.connect();
  await assert.rejects(c.ready(5000), UnauthorizedError);
  assert.equal(c.state, "disconnected");
  await delay(300);
  assert.equal(rec.attempts, 1);
});

test("close 4500 (no token where one is required) stops reconnecting, with an UnauthorizedError", async (t) => {
  const rec = recordingWebSocket();
  const c = makeClient(server.url, { WebSocket: rec.WebSocket, minReconnectDelay: 20, maxReconnectDelay: 50 });
  c.connect();
  // Connected (anonymous) at once; the server closes it after authorize_timeout.
  await waitFor(c, "connected");
  const end = await waitFor(c, "disconnected", () => true, 5000);
  assert.equal(end.code, 4500);
  assert.equal(end.reconnect, false);
  assert.ok(end.error instanceof UnauthorizedError);
  await delay(300);
  assert.equal(rec.attempts, 1);
});

test("getToken() throwing UnauthorizedError stops connecting; other errors are retried", async (t) => {
  const rec = recordingWebSocket();
  let calls = 0;
  const user = unique("u");
  const c = makeClient(server.url, {
    WebSocket: rec.WebSocket,
    getToken: async () => {
      calls++;
      if (calls <= 2) throw new Error("the auth service is down");
      if (calls === 3) return mint({ sub: user });
      throw new UnauthorizedError("logged out");
    },
    minReconnectDelay: 20,
    maxReconnectDelay: 50,
  });
  const errors = [];
  c.on("error", (e) => errors.push(e.type));
  c.connect();
  const info = await waitFor(c, "connected", () => true, 5000);
  assert.equal(calls, 3);
  assert.deepEqual(errors, ["token", "token"]);
  assert.equal(info.userId, user);
  c.disconnect();

  // An app that says the user is logged out: no connection is even tried.
  const rec2 = recordingWebSocket();
  const c2 = makeClient(server.url, {
    WebSocket: rec2.WebSocket,
    getToken: async () => {
      throw new UnauthorizedError("logged out");
    },
    minReconnectDelay: 20,
    maxReconnectDelay: 50,
  });
  c2.connect();
  await assert.rejects(c2.ready(5000), { name: "UnauthorizedError", message: "logged out" });
  assert.equal(c2.state, "disconnected");
  await delay(200);
  assert.equal(rec2.attempts, 0);
});
