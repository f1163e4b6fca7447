// A subscription's own states and its errors, and events of channels the
// server subscribed by itself.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Server, mint, recordingWebSocket, waitFor, unique, until, makeClient, disconnectAll } from "./helpers.mjs";

let server;
before(async () => {
  server = await new Server().start();
});
after(async () => {
  disconnectAll();
  await server?.close();
});

function connected(user = unique("u")) {
  const rec = recordingWebSocket();
  const c = makeClient(server.url, { WebSocket: rec.WebSocket, token: mint({ sub: user }), minReconnectDelay: 20, maxReconnectDelay: 100 });
  c.connect();
  return { c, rec, user };
}

test("a subscription goes unsubscribed -> subscribing -> subscribed -> unsubscribed, and subscribing again recovers what was published meanwhile", async () => {
  const { c, rec } = connected();
  const channel = unique("missions:");
  const sub = c.newSubscription(channel);
  const states = [];
  sub.on("state", (s) => states.push(s.state));
  assert.equal(sub.state, "unsubscribed");
  assert.equal(sub.position, null);
  sub.subscribe();
  await sub.ready(5000);
  assert.equal(sub.position.offset, 0);
  const first = waitFor(sub, "event");
  await server.publish(channel, "x", { n: 1 });
  assert.equal((await first).offset, 1);
  const gone = waitFor(sub, "unsubscribed");
  sub.unsubscribe();
  assert.equal((await gone).reason, "client");
  await until(() => rec.received.some((f) => f.type === "unsubscribed" && f.channel === channel), 5000, "the server's unsubscribed");
  const late = [];
  sub.on("event", (e) => late.push(e));
  await server.publish(channel, "x", { n: 2 });
  // Subscribing again recovers from where it was: the event published while away.
  sub.subscribe();
  const ctx = await waitFor(sub, "subscribed");
  assert.equal(ctx.recovered, true);
  assert.equal(ctx.missed, 1);
  await until(() => late.length === 1, 5000, "the missed event");
  // It came from the replay: nothing reached the subscription while it was unsubscribed.
  assert.deepEqual([late[0].offset, late[0].replayed], [2, true]);
  assert.deepEqual(states, ["subscribing", "subscribed", "unsubscribed", "subscribing", "subscribed"]);
});

test("a refused subscribe ends unsubscribed with the error, and ready() rejects with it", async () => {
  const { c } = connected();
  const sub = c.newSubscription(`thread:x#${unique("someone-else")}`);
  sub.subscribe();
  await assert.rejects(sub.ready(5000), { code: "permission_denied" });
  assert.equal(sub.state, "unsubscribed");
  const bad = c.newSubscription("no spaces allowed");
  const ended = waitFor(bad, "unsubscribed");
  bad.subscribe();
  const ctx = await ended;
  assert.equal(ctx.reason, "error");
  assert.equal(ctx.error.code, "invalid_channel");
  assert.throws(() => c.newSubscription("no spaces allowed"), /exists/);
});

test("events of the personal channel, which the server subscribed, arrive as publications", async () => {
  const { c, user } = connected();
  const subscribed = waitFor(c, "serverSubscribed", (s) => s.channel === `user#${user}`);
  await c.ready(5000);
  await subscribed;
  const got = waitFor(c, "publication", (e) => e.channel === `user#${user}`);
  await server.admin("POST", `/api/ws/users/${user}/send`, { type: "notice", data: { hello: user } });
  const e = await got;
  assert.equal(e.event, "notice");
  assert.deepEqual(e.data, { hello: user });
});
