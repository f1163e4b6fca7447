// Reconnecting Socket.IO clients recover with `since` (SPEC §6): after a
// disconnect of their own and after the server restarted, a client that
// subscribes again from its last offset misses nothing and sees nothing twice.
import { test, before, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import { Server, connect, closeAll, next, unique, until } from "./helpers.mjs";

let server;
before(async () => {
  server = await new Server().start();
});
afterEach(() => closeAll());
after(async () => {
  await server.close();
});

test("reconnect and recover with since: after a disconnect, and across a server restart", async () => {
  const channel = unique("recover-");
  const socket = connect(server, "/ws", { transports: ["websocket"] });
  const seen = [];
  let last = null;
  socket.on("event", (e) => {
    if (e.channel !== channel) return;
    seen.push(e.offset);
    last = { offset: e.offset, epoch: e.epoch };
  });
  const subs = [];
  socket.on("subscribed", (s) => subs.push(s));
  // What a reconnecting frontend does: subscribe again from where it was.
  socket.on("connect", () => socket.emit("subscribe", last ? { channel, since: last } : { channel }));
  await until(() => subs.length === 1, 10000, "the first subscribe");
  for (let i = 0; i < 3; i++) await server.publish(channel, "e", { i });
  await until(() => seen.length === 3, 10000, "3 live events");

  socket.disconnect();
  for (let i = 3; i < 5; i++) await server.publish(channel, "e", { i });
  socket.connect();
  await until(() => subs.length === 2, 10000, "the subscribe after reconnecting");
  assert.equal(subs[1].recovered, true);
  assert.equal(subs[1].missed, 2);
  await until(() => seen.length === 5, 10000, "the 2 missed events");

  // The server goes away (SIGTERM: `disconnect` with reconnect: true) and
  // comes back on the same port; the client reconnects by itself.
  const bye = next(socket, "disconnect_reason");
  await server.stop();
  assert.deepEqual(await bye, { code: 1001, reason: "going away", reconnect: true });
  await server.start();
  await until(() => subs.length === 3, 20000, "the subscribe after the restart");
  assert.equal(subs[2].recovered, true);
  assert.equal(subs[2].missed, 0);
  await server.publish(channel, "e", { i: 5 });
  await until(() => seen.length === 6, 10000, "a live event after the restart");
  assert.deepEqual(seen, seen.map((_, i) => seen[0] + i), "every offset once, in order");
});
