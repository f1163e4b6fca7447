// Subscriptions across server restarts: recovery with `since`, no gap, no
// duplicate; `recovered: false` as the "reload your state" signal.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { Server, mint, recordingWebSocket, waitFor, unique, until, makeClient, disconnectAll } from "./helpers.mjs";

after(() => disconnectAll());

function client(server, rec, sub) {
  return makeClient(server.url, {
    WebSocket: rec.WebSocket,
    token: mint({ sub: sub ?? unique("u") }),
    minReconnectDelay: 20,
    maxReconnectDelay: 200,
  });
}

/** Collects a subscription's events and `subscribed` contexts. */
function watch(sub) {
  const seen = { events: [], subscribed: [], reloads: [], states: [] };
  sub.on("event", (e) => seen.events.push(e));
  sub.on("subscribed", (ctx) => seen.subscribed.push(ctx));
  sub.on("reload", (ctx) => seen.reloads.push(ctx));
  sub.on("state", (s) => seen.states.push(s.state));
  return seen;
}

test("after the server restarts (SIGTERM, same port and data dir) the subscription recovers every missed event, without gap or duplicate", async (t) => {
  const server = await new Server().start();
  t.after(() => server.close());
  const rec = recordingWebSocket();
  const c = client(server, rec);
  t.after(() => c.disconnect());
  const channel = unique("missions:");
  const sub = c.newSubscription(channel);
  const seen = watch(sub);
  sub.subscribe();
  c.connect();
  await sub.ready(10000);
  for (let i = 1; i <= 3; i++) await server.publish(channel, "mission_updated", { n: i });
  await until(() => seen.events.length === 3, 5000, "3 live events");
  const epoch = seen.events[0].epoch;

  // The server goes down, gracefully: `disconnect` 1001, reconnect: true.
  rec.shut = true; // Hold the client off until the missed events are published.
  const lost = waitFor(c, "connecting");
  const pid = server.pid;
  await server.stop("SIGTERM");
  const why = await lost;
  assert.equal(why.code, 1001);
  assert.equal(why.reconnect, true);
  assert.equal(sub.state, "subscribing");
  await server.start();
  assert.notEqual(server.pid, pid);
  for (let i = 4; i <= 6; i++) await server.publish(channel, "mission_updated", { n: i });

  rec.shut = false;
  const resubscribed = waitFor(sub, "subscribed");
  await waitFor(c, "connected", () => true, 10000);
  const ctx = await resubscribed;
  assert.equal(ctx.resubscribed, true);
  assert.equal(ctx.recovering, true);
  assert.equal(ctx.recovered, true);
  assert.equal(ctx.missed, 3);
  // The resubscribe sent the last position seen.
  const again = rec.sent.filter((f) => f.type === "subscribe" && f.channel === channel).at(-1);
  assert.deepEqual(again.since, { offset: 3, epoch });
  await server.publish(channel, "mission_updated", { n: 7 });
  await until(() => seen.events.length === 7, 5000, "7 events");
  assert.deepEqual(seen.events.map((e) => e.offset), [1, 2, 3, 4, 5, 6, 7]);
  assert.deepEqual(seen.events.map((e) => e.data.n), [1, 2, 3, 4, 5, 6, 7]);
  assert.deepEqual(seen.events.map((e) => e.replayed), [false, false, false, true, true, true, false]);
  assert.ok(seen.events.every((e) => e.epoch === epoch), "the embedded store keeps its epoch across restarts");
  assert.deepEqual(sub.position, { offset: 7, epoch });
  assert.equal(seen.reloads.length, 0);
  assert.deepEqual(seen.states, ["subscribing", "subscribed", "subscribing", "subscribed"]);
});

test("a subscribe with a wrong epoch gets recovered: false and a reload signal, then live events from the current position", async (t) => {
  const server = await new Server().start();
  t.after(() => server.close());
  const rec = recordingWebSocket();
  const c = client(server, rec);
  t.after(() => c.disconnect());
  const channel = unique("missions:");
  await server.publish(channel, "x", { n: 1 });
  await server.publish(channel, "x", { n: 2 });
  const sub = c.newSubscription(channel, { since: { offset: 1, epoch: "not-the-epoch" } });
  const seen = watch(sub);
  const reload = waitFor(sub, "reload");
  sub.subscribe();
  c.connect();
  const r = await reload;
  assert.deepEqual(r.since, { offset: 1, epoch: "not-the-epoch" });
  assert.equal(r.position.offset, 2);
  assert.notEqual(r.position.epoch, "not-the-epoch");
  assert.equal(seen.subscribed[0].recovered, false);
  assert.equal(seen.subscribed[0].missed, 0);
  assert.equal(sub.state, "subscribed");
  assert.deepEqual(sub.position, r.position);
  // No partial replay: nothing of offsets 1-2; the next live event follows.
  await server.publish(channel, "x", { n: 3 });
  await until(() => seen.events.length === 1, 5000, "a live event");
  assert.equal(seen.events[0].offset, 3);
  assert.equal(seen.events[0].replayed, false);
});

test("after a memory bus restarts (SIGKILL, new epoch) the resubscribe reports recovered: false and reload", async (t) => {
  const server = await new Server({ args: ["--backend", "memory"] }).start();
  t.after(() => server.close());
  const rec = recordingWebSocket();
  const c = client(server, rec);
  t.after(() => c.disconnect());
  const channel = unique("missions:");
  const sub = c.newSubscription(channel);
  const seen = watch(sub);
  sub.subscribe();
  c.connect();
  await sub.ready(10000);
  await server.publish(channel, "x", { n: 1 });
  await until(() => seen.events.length === 1, 5000, "an event");
  const before = sub.position;
  const lost = waitFor(c, "connecting");
  await server.stop("SIGKILL");
  assert.equal((await lost).code, 1006);
  // The client may be back before start() has seen the gateway ready.
  const reloaded = waitFor(sub, "reload", () => true, 15000);
  await server.start();
  const reload = await reloaded;
  assert.deepEqual(reload.since, before);
  assert.notEqual(reload.position.epoch, before.epoch);
  assert.equal(seen.subscribed.at(-1).recovered, false);
  await server.publish(channel, "x", { n: 2 });
  await until(() => seen.events.length === 2, 5000, "a live event in the new epoch");
  assert.equal(seen.events[1].epoch, reload.position.epoch);
  assert.equal(seen.events[1].offset, 1);
});
