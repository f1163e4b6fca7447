// The handshake's `auth.token` (SPEC §3.6) on a node that refuses anonymous
// connections: a valid JWT authenticates the connection, a bad one is a
// connect_error, none must `authorize` before anything else.
import { test, before, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import { Server, connect, closeAll, next, mint, unique } from "./helpers.mjs";

let server;
before(async () => {
  server = await new Server({ env: { SWITCHBOARD_AUTH__ANONYMOUS: "false" } }).start();
});
afterEach(() => closeAll());
after(async () => {
  await server.close();
});

test("auth.token with a JWT: the connection is the user's, with its personal channel", async () => {
  const user = unique("alice");
  const socket = connect(server, "/ws", { transports: ["websocket"], auth: { token: mint({ sub: user }) } });
  const [connected] = await Promise.all([
    next(socket, "connected"),
    next(socket, "subscribed", (s) => s.channel === `user#${user}`),
  ]);
  assert.equal(connected.user_id, user);
  const event = next(socket, "event");
  await server.admin("POST", `/api/ws/users/${user}/send`, { type: "hello", data: { to: user } });
  const e = await event;
  assert.deepEqual([e.channel, e.event, e.data], [`user#${user}`, "hello", { to: user }]);
});

test("a bad token is refused with connect_error", async () => {
  const socket = connect(server, "/ws", { transports: ["websocket"], reconnection: false, auth: { token: "not.a.jwt" } });
  const err = await next(socket, "connect_error");
  assert.equal(err.data.code, "unauthorized");
  assert.ok(!socket.connected);
});

test("without a token: nothing but authorize, then the user's", async () => {
  const user = unique("bob");
  const socket = connect(server, "/", { transports: ["websocket"] });
  const connected = await next(socket, "connected");
  assert.equal(connected.user_id, null);
  const refused = await socket.timeout(10000).emitWithAck("subscribe", { channel: "missions" });
  assert.equal(refused.code, "unauthorized");
  const authorized = await socket.timeout(10000).emitWithAck("authorize", { token: mint({ sub: user }) });
  assert.equal(authorized.user_id, user);
  const sub = await socket.timeout(10000).emitWithAck("subscribe", { channel: "missions" });
  assert.equal(sub.channel, "missions");
});
