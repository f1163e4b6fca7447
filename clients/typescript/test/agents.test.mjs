// Agent runs with the built-in echo agent: streamed AG-UI events, interrupt,
// and a run resumed from its thread channel after a reconnect.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { SwitchboardError } from "../dist/index.mjs";
import { Server, mint, recordingWebSocket, unique, until, withTimeout, makeClient, disconnectAll } from "./helpers.mjs";

let server;
before(async () => {
  // One word every 100 ms: slow enough to interrupt, or reconnect, mid-run.
  server = await new Server({ config: `[agents]\necho = { delay_ms = 100 }\n` }).start();
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

const types = (events) => events.map((e) => e.type);

test("chat() returns the run, whose async iterator yields its AG-UI events in order until RUN_FINISHED", async (t) => {
  const { c, user } = connected();
  const run = await c.chat("hello streaming world", { agent: "echo" });
  assert.match(run.runId, /\S/);
  assert.equal(run.channel, `thread:${run.threadId}#${user}`);
  assert.equal(run.position.offset, 0);
  const seen = [];
  await withTimeout((async () => { for await (const e of run) seen.push(e); })(), 15000, "the run's events");
  assert.deepEqual(types(seen), [
    "RUN_STARTED",
    "TEXT_MESSAGE_START",
    "TEXT_MESSAGE_CONTENT",
    "TEXT_MESSAGE_CONTENT",
    "TEXT_MESSAGE_CONTENT",
    "TEXT_MESSAGE_END",
    "RUN_FINISHED",
  ]);
  assert.equal(run.text, "hello streaming world");
  assert.equal(run.status, "finished");
  assert.equal((await run.done).type, "RUN_FINISHED");
  assert.equal(seen[0].runId, run.runId);
  // A second turn on the same thread; a third while it runs is refused (thread_busy).
  const second = await c.chat("again", { threadId: run.threadId });
  assert.equal(second.threadId, run.threadId);
  await assert.rejects(c.chat("busy", { threadId: run.threadId }), (e) => e instanceof SwitchboardError && e.code === "thread_busy");
  assert.equal((await withTimeout(second.done, 15000, "the second run")).type, "RUN_FINISHED");
  assert.equal(c.activeRuns().length, 0);
  c.disconnect();
});

test("interrupt(runId) stops a streaming run: RUN_ERROR cancelled ends the iterator, with part of the text", async (t) => {
  const { c } = connected();
  const words = "one two three four five six seven eight nine ten eleven twelve".split(" ");
  const run = await c.chat(words.join(" "), { agent: "echo" });
  const seen = [];
  let interrupted;
  const iterate = async () => {
    for await (const e of run) {
      seen.push(e);
      if (e.type === "TEXT_MESSAGE_CONTENT" && !interrupted) interrupted = c.interrupt(run.runId);
    }
  };
  await withTimeout(iterate(), 15000, "the run's events");
  const answer = await interrupted;
  assert.deepEqual(answer, { runId: run.runId, threadId: run.threadId, cancelled: true });
  const last = seen.at(-1);
  assert.equal(last.type, "RUN_ERROR");
  assert.equal(last.code, "cancelled");
  // The open message was closed before the error (the bridge repairs the stream).
  assert.equal(seen.at(-2).type, "TEXT_MESSAGE_END");
  assert.equal(run.status, "error");
  assert.ok(run.text.length > 0 && run.text.length < words.join(" ").length, `text ${JSON.stringify(run.text)}`);
  // Stopping it again is harmless: cancelled is false.
  assert.equal((await run.interrupt()).cancelled, false);
  c.disconnect();
});

test("a run goes on through a reconnect: the client resumes it from its thread channel, every seq once", async (t) => {
  const { c, rec } = connected();
  const text = "a b c d e f g h i j";
  const run = await c.chat(text, { agent: "echo" });
  const seen = [];
  let dropped = false;
  const iterate = async () => {
    for await (const e of run) {
      seen.push(e);
      if (e.type === "TEXT_MESSAGE_CONTENT" && !dropped) {
        // Drop the socket mid-run (1006) and stay away for a few attempts, while
        // the run goes on on the server (on_disconnect: continue) and its events
        // reach only the thread channel.
        dropped = true;
        rec.shut = true;
        const attempts = rec.attempts;
        rec.sockets.at(-1).terminate();
        until(() => rec.attempts >= attempts + 3, 5000, "reconnect attempts").then(() => (rec.shut = false));
      }
    }
  };
  await withTimeout(iterate(), 15000, "the run's events, across the reconnect");
  assert.equal(run.text, text);
  assert.equal(seen.at(-1).type, "RUN_FINISHED");
  assert.deepEqual(seen.map((e) => e.type).filter((t) => t === "TEXT_MESSAGE_CONTENT").length, 10);
  // It reconnected, and resumed with the run's position on its thread channel,
  // which replayed what the run emitted meanwhile.
  assert.ok(rec.sockets.length >= 2);
  const resume = rec.sent.find((f) => f.type === "subscribe" && f.channel === run.channel);
  assert.deepEqual(resume.since, run.position);
  const subscribed = rec.received.find((f) => f.type === "subscribed" && f.channel === run.channel);
  assert.equal(subscribed.recovered, true);
  assert.ok(subscribed.missed > 1, `missed ${subscribed.missed}`);
  // The resume subscription is removed once the run ended.
  await until(() => rec.sent.some((f) => f.type === "unsubscribe" && f.channel === run.channel), 2000, "the unsubscribe");
  assert.equal(c.getSubscription(run.channel), undefined);
  c.disconnect();
});
