// The console page in a real browser (Debian's chromium, driven by
// playwright-core) against the real `switchboard up`: over WebSocket, and
// over SSE with `window.WebSocket` removed. One screenshot per step, saved
// to $CONSOLE_SCREENSHOTS (else a temporary directory, printed).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { Server, ADMIN_KEY } from "./server.mjs";

const shots = process.env.CONSOLE_SCREENSHOTS ?? mkdtempSync(join(tmpdir(), "sb-console-shots-"));
mkdirSync(shots, { recursive: true });
console.log(`# screenshots in ${shots}`);

let browser;
before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    // Root in a container has no user namespaces for chromium's sandbox.
    args: ["--no-sandbox"],
  });
});
after(async () => {
  await browser?.close();
});

/** A fresh page; `init` runs before the page's own scripts. */
async function open(t, init) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
  t.after(() => context.close());
  if (init) await context.addInitScript(init);
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e));
  t.after(() => assert.deepEqual(errors, [], "no uncaught error in the page"));
  return page;
}

function snap(page, name) {
  return page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
}

const connected = (page) => page.waitForSelector('#state[data-state="connected"]');

/** The events shown for `channel`: [offset, recovered?] in order. */
function shown(page, channel) {
  return page.$$eval(`#events li[data-channel="${channel}"]`, (lis) => lis.map((li) => [Number(li.dataset.offset), li.classList.contains("replayed")]));
}

async function subscribe(page, channel) {
  await page.fill("#channel", channel);
  await page.click("#subscribe");
  await page.waitForSelector(`#subscriptions li[data-channel="${channel}"][data-state^="subscribed"]`);
}

// Holds the page's WebSockets off (they dial a closed port) while
// `window.__hold` is set, as a network that is down would.
const HOLDABLE_WEBSOCKET = () => {
  const Real = window.WebSocket;
  window.__hold = false;
  window.WebSocket = class extends Real {
    constructor(url, protocols) {
      super(window.__hold ? "ws://127.0.0.1:1/" : url, protocols);
    }
  };
};

test("over WebSocket: connects, watches a channel, publishes, chats, stops a run, and recovers across a server restart", async (t) => {
  const server = await new Server().start();
  t.after(() => server.close());
  const page = await open(t, HOLDABLE_WEBSOCKET);
  const channel = "missions:console";

  await page.goto(`${server.http}/?admin_key=${ADMIN_KEY}`);
  await connected(page);
  assert.equal(await page.textContent("#transport"), "websocket");
  assert.equal(await page.textContent("#reconnects"), "0");
  await snap(page, "ws-01-connected");

  await subscribe(page, channel);
  await snap(page, "ws-02-subscribed");

  // Published by a producer over gRPC, then from the page (HTTP API).
  await server.publishGrpc(channel, "mission_updated", { n: 1 });
  await page.waitForSelector(`#events li[data-channel="${channel}"][data-offset="1"]`);
  assert.match(await page.textContent(`#events li[data-offset="1"]`), /mission_updated \{"n":1\}/);
  await page.fill("#pub-channel", channel);
  await page.fill("#pub-data", '{"n": 2}');
  await page.click("#publish");
  await page.waitForSelector(`#events li[data-channel="${channel}"][data-offset="2"]`);
  assert.equal(await page.textContent("#publish-result"), "published at offset 2");
  assert.match(await page.textContent(`#events li[data-offset="2"]`), /"n":2/);
  await snap(page, "ws-03-events");

  // A chat with the echo agent, its text streamed in.
  await page.fill("#agent", "echo");
  await page.fill("#message", "hello from a real browser");
  await page.click("#send");
  await page.waitForFunction(() => document.querySelector("#run-status").textContent === "finished");
  assert.equal(await page.textContent("#chat-text"), "hello from a real browser");
  await snap(page, "ws-04-chat");

  // A long run, stopped with the button once its text has started.
  const long = Array.from({ length: 200 }, (_, i) => `w${i}`).join(" ");
  await page.fill("#message", long);
  await page.click("#send");
  await page.waitForFunction(() => document.querySelector("#chat-text").textContent.length > 0);
  await page.click("#stop");
  await page.waitForFunction(() => document.querySelector("#run-status").textContent.startsWith("error"));
  assert.match(await page.textContent("#run-status"), /cancelled/);
  const partial = await page.textContent("#chat-text");
  assert.ok(partial.length > 0 && partial.length < long.length, `stopped midway: ${partial.length} of ${long.length}`);
  await snap(page, "ws-05-stopped");

  // The server restarts (same port, same data); events published meanwhile
  // are recovered by the console's resubscribe, with no gap.
  await page.evaluate(() => (window.__hold = true));
  await server.stop("SIGTERM");
  await page.waitForSelector('#state[data-state="connecting"]');
  await snap(page, "ws-06-server-down");
  await server.start();
  assert.equal(await server.publish(channel, "mission_updated", { n: 3 }), 3);
  assert.equal(await server.publish(channel, "mission_updated", { n: 4 }), 4);
  await page.evaluate(() => (window.__hold = false));
  await connected(page);
  await page.waitForSelector(`#events li[data-channel="${channel}"][data-offset="4"]`);
  assert.equal(await page.textContent("#reconnects"), "1");
  assert.match(await page.textContent(`#subscriptions li[data-channel="${channel}"]`), /recovered 2 missed/);
  assert.deepEqual(await shown(page, channel), [
    [1, false],
    [2, false],
    [3, true],
    [4, true],
  ]);
  await server.publish(channel, "mission_updated", { n: 5 });
  await page.waitForSelector(`#events li[data-channel="${channel}"][data-offset="5"]`);
  assert.deepEqual((await shown(page, channel)).map(([o]) => o), [1, 2, 3, 4, 5], "live again, no duplicate");
  await snap(page, "ws-07-recovered");

  await page.click("#refresh-stats");
  await page.waitForFunction(() => document.querySelector("#stats").textContent.includes("total_connections"));
  const stats = JSON.parse(await page.textContent("#stats"));
  assert.equal(stats.total_connections, 1);
  assert.equal(stats.channels[channel], 1);
  await snap(page, "ws-08-stats");
});

test("with WebSockets blocked, the same page works over SSE, and recovers across a server restart", async (t) => {
  const server = await new Server().start();
  t.after(() => server.close());
  const page = await open(t, () => {
    delete window.WebSocket;
  });
  const channel = "missions:sse";

  await page.goto(`${server.http}/?admin_key=${ADMIN_KEY}`);
  await connected(page);
  assert.equal(await page.evaluate(() => typeof window.WebSocket), "undefined");
  assert.equal(await page.textContent("#transport"), "sse");
  await snap(page, "sse-01-connected");

  await subscribe(page, channel);
  assert.equal(await server.publish(channel, "mission_updated", { n: 1 }), 1);
  await page.waitForSelector(`#events li[data-channel="${channel}"][data-offset="1"]`);
  await page.fill("#pub-channel", channel);
  await page.fill("#pub-data", '{"n": 2}');
  await page.click("#publish");
  await page.waitForSelector(`#events li[data-channel="${channel}"][data-offset="2"]`);
  await snap(page, "sse-02-events");

  // Chat over the AG-UI HTTP endpoint: streamed, then a long run stopped.
  await page.fill("#message", "hello over sse");
  await page.click("#send");
  await page.waitForFunction(() => document.querySelector("#run-status").textContent === "finished");
  assert.equal(await page.textContent("#chat-text"), "hello over sse");
  const long = Array.from({ length: 200 }, (_, i) => `w${i}`).join(" ");
  await page.fill("#message", long);
  await page.click("#send");
  await page.waitForFunction(() => document.querySelector("#chat-text").textContent.length > 0);
  await page.click("#stop");
  await page.waitForFunction(() => document.querySelector("#run-status").textContent === "stopped");
  assert.ok((await page.textContent("#chat-text")).length < long.length);
  await snap(page, "sse-03-chat-stopped");

  // The server restarts; the browser's own EventSource reconnect (with
  // Last-Event-ID) is held off until the missed events are published.
  const refuse = (route) => route.abort("connectionrefused");
  await page.route("**/sse?**", refuse);
  await server.stop("SIGTERM");
  await page.waitForSelector('#state[data-state="connecting"]');
  await server.start();
  assert.equal(await server.publish(channel, "mission_updated", { n: 3 }), 3);
  assert.equal(await server.publish(channel, "mission_updated", { n: 4 }), 4);
  await page.unroute("**/sse?**", refuse);
  await connected(page);
  await page.waitForSelector(`#events li[data-channel="${channel}"][data-offset="4"]`);
  assert.equal(await page.textContent("#reconnects"), "1");
  assert.deepEqual(await shown(page, channel), [
    [1, false],
    [2, false],
    [3, true],
    [4, true],
  ]);
  await snap(page, "sse-04-recovered");
});
