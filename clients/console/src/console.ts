// The console page (SPEC §7.7), served by the gateway at `GET /`.
//
// Over WebSocket it is a plain user of @switchboard/client. Where WebSockets
// are not available (blocked by a proxy, or `window.WebSocket` missing), it
// reads channels over Server-Sent Events (`GET /sse`, whose cursor the
// browser's `EventSource` sends back as `Last-Event-ID` on its own
// reconnects), publishes through the HTTP API and chats through the AG-UI
// HTTP endpoint (`POST /agui/{agent}`, stopped by aborting the request).

import { Client, LocalCode, type ChannelEvent, type Run } from "../../typescript/src/index.ts";

// === The page ===

function el<T extends HTMLElement = HTMLElement>(id: string): T {
  const e = document.getElementById(id);
  if (!e) throw new Error(`no #${id}`);
  return e as T;
}
const input = (id: string) => el<HTMLInputElement>(id);

type State = "disconnected" | "connecting" | "connected";

const ui = {
  state(state: State): void {
    const s = el("state");
    s.textContent = state;
    s.dataset.state = state;
  },
  reconnects(n: number): void {
    el("reconnects").textContent = String(n);
  },
  transport(name: string): void {
    el("transport").textContent = name;
  },
  user(id: string | null): void {
    el("user").textContent = id ? `user ${id}` : "";
  },
  /** A line in the event log. */
  event(e: ChannelEvent): void {
    const li = document.createElement("li");
    li.dataset.channel = e.channel;
    li.dataset.offset = String(e.offset);
    li.dataset.event = e.event;
    if (e.replayed) li.classList.add("replayed");
    li.textContent = `${e.channel} #${e.offset} ${e.event} ${JSON.stringify(e.data)}${e.replayed ? " (recovered)" : ""}`;
    append(li);
  },
  note(text: string): void {
    const li = document.createElement("li");
    li.className = "note";
    li.textContent = text;
    append(li);
  },
  /** A subscription's line: its state and what its last `subscribed` said. */
  subscription(channel: string, state: string): void {
    const list = el("subscriptions");
    let li = [...list.children].find((c) => (c as HTMLElement).dataset.channel === channel) as HTMLElement | undefined;
    if (!li) {
      li = document.createElement("li");
      li.dataset.channel = channel;
      list.append(li);
    }
    li.dataset.state = state;
    li.textContent = `${channel}: ${state}`;
  },
  runStatus(text: string): void {
    el("run-status").textContent = text;
  },
};

function append(li: HTMLElement): void {
  const log = el("events");
  log.append(li);
  while (log.children.length > 500) log.firstElementChild!.remove();
  log.scrollTop = log.scrollHeight;
}

function httpBase(): string {
  return location.origin;
}

async function api(method: string, path: string, body?: unknown): Promise<unknown> {
  const headers: Record<string, string> = { "content-type": "application/json" };
  const key = input("admin-key").value.trim();
  if (key) headers.authorization = `Bearer ${key}`;
  const r = await fetch(httpBase() + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const json = await r.json().catch(() => null);
  if (!r.ok) throw new Error(json?.error ? `${json.error.code}: ${json.error.message}` : `HTTP ${r.status}`);
  return json;
}

/** What the page does, over one transport or the other. */
interface Transport {
  readonly name: string;
  subscribe(channel: string): void;
  publish(channel: string, event: string, data: unknown): Promise<number>;
  chat(agent: string, text: string, onText: (delta: string) => void): Promise<{ stop(): Promise<void>; done: Promise<string> }>;
  stats(): Promise<unknown>;
  close(): void;
}

// === Over WebSocket: the TypeScript client ===

class WsTransport implements Transport {
  readonly name = "websocket";
  private client: Client;
  private threadId: string | undefined;

  constructor(url: string, token: string) {
    this.client = new Client(url, { token: token || undefined, maxReconnectDelay: 5000 });
    this.client.on("state", ({ state }) => ui.state(state));
    this.client.on("connected", (ctx) => {
      ui.reconnects(ctx.reconnects);
      ui.user(ctx.userId);
      ui.note(ctx.reconnects ? `reconnected (${ctx.reconnects})` : "connected");
    });
    this.client.on("connecting", (ctx) => {
      if (ctx.code !== LocalCode.CALLED) ui.note(`connecting: ${ctx.code} ${ctx.reason}`);
    });
    this.client.on("disconnected", (ctx) => ui.note(`disconnected: ${ctx.code} ${ctx.reason}`));
    this.client.on("publication", (e) => ui.event(e));
    this.client.connect();
  }

  subscribe(channel: string): void {
    if (this.client.getSubscription(channel)) return;
    const sub = this.client.newSubscription(channel);
    sub.on("state", ({ state }) => ui.subscription(channel, state));
    sub.on("subscribed", (ctx) => {
      if (!ctx.recovering) return;
      const what = ctx.recovered ? `recovered ${ctx.missed} missed` : "could not recover: reload";
      ui.subscription(channel, `subscribed, ${what}`);
      ui.note(`${channel}: ${what}`);
    });
    sub.on("event", (e) => ui.event(e));
    sub.on("error", ({ error }) => ui.note(`${channel}: ${error.code}: ${error.message}`));
    sub.subscribe();
  }

  async publish(channel: string, event: string, data: unknown): Promise<number> {
    if (input("admin-key").value.trim()) return ((await api("POST", "/api/ws/broadcast", { channel, type: event, message: data })) as { offset: number }).offset;
    return (await this.client.publish(channel, event, data)).offset;
  }

  async chat(agent: string, text: string, onText: (delta: string) => void) {
    const run: Run = await this.client.chat(text, { agent, threadId: this.threadId });
    this.threadId = run.threadId;
    const done = (async () => {
      for await (const e of run) if (e.type === "TEXT_MESSAGE_CONTENT") onText(String(e.delta ?? ""));
      const last = run.events[run.events.length - 1];
      return last?.type === "RUN_ERROR" ? `error: ${String(last.code ?? last.message ?? "")}` : run.status;
    })();
    return {
      stop: async () => {
        await run.interrupt();
      },
      done,
    };
  }

  async stats(): Promise<unknown> {
    if (input("admin-key").value.trim()) return api("GET", "/api/ws/stats");
    return this.client.rpc("get_status", {});
  }

  close(): void {
    this.client.disconnect();
  }
}

// === Over Server-Sent Events ===

const SSE_TYPES = ["event", "subscribed", "unsubscribed", "error", "disconnect"];

class SseTransport implements Transport {
  readonly name = "sse";
  private source: EventSource | null = null;
  private channels: string[] = [];
  /** The last cursor (`id:`) received, handed to the next stream when channels change. */
  private cursor = "";
  private reconnects = 0;
  private everOpen = false;
  private threadId = crypto.randomUUID();
  private closed = false;
  private seen = new Map<string, { offset: number; epoch: string }>();
  /** Missed events still to come per channel, as its `subscribed` said. */
  private replay = new Map<string, number>();

  constructor(private readonly token: string) {
    // A stream without channels still carries the personal channel (with a
    // token) and broadcasts; subscribing reopens it with the channels.
    this.open();
  }

  subscribe(channel: string): void {
    if (this.channels.includes(channel)) return;
    this.channels.push(channel);
    ui.subscription(channel, "subscribing");
    this.open();
  }

  /** (Re)opens the stream for every channel, from the last cursor. */
  private open(): void {
    this.source?.close();
    const q = new URLSearchParams();
    for (const c of this.channels) q.append("channel", c);
    if (this.token) q.set("token", this.token);
    if (this.cursor) q.set("last_event_id", this.cursor);
    ui.state("connecting");
    const source = new EventSource(`${httpBase()}/sse?${q}`);
    this.source = source;
    // A stream reopened for a new channel list is not a reconnect; the
    // browser's own reopening of a stream that was open is.
    let wasOpen = false;
    source.onopen = () => {
      if (source !== this.source) return;
      if (wasOpen) {
        this.reconnects++;
        ui.reconnects(this.reconnects);
        ui.note(`reconnected (${this.reconnects})`);
      } else if (!this.everOpen) {
        ui.note("connected over SSE");
      }
      wasOpen = true;
      this.everOpen = true;
      ui.state("connected");
    };
    source.onerror = () => {
      if (source !== this.source || this.closed) return;
      // The browser retries by itself (after `retry:`), sending Last-Event-ID,
      // unless the answer was an HTTP error: then the stream is closed.
      if (source.readyState === EventSource.CLOSED) {
        ui.state("disconnected");
        ui.note("the server refused the stream");
      } else {
        ui.state("connecting");
        for (const c of this.channels) ui.subscription(c, "subscribing");
      }
    };
    for (const type of SSE_TYPES) source.addEventListener(type, (m) => this.message(source, type, m as MessageEvent));
  }

  private message(source: EventSource, type: string, m: MessageEvent): void {
    // EventSource's own `error` event (a failed connection) has the name of
    // the `error` frame, and no data.
    if (source !== this.source || typeof m.data !== "string") return;
    if (m.lastEventId) this.cursor = m.lastEventId;
    const f = JSON.parse(m.data);
    if (type === "event") {
      const seen = this.seen.get(f.channel);
      if (seen && seen.epoch === f.epoch && f.offset <= seen.offset) return;
      if (f.offset > 0) this.seen.set(f.channel, { offset: f.offset, epoch: f.epoch });
      const left = this.replay.get(f.channel) ?? 0;
      if (left > 0) this.replay.set(f.channel, left - 1);
      ui.event({ ...f, replayed: left > 0 });
    } else if (type === "subscribed") {
      let state = "subscribed";
      if (f.recovered === true) {
        state = `subscribed, recovered ${f.missed} missed`;
        this.replay.set(f.channel, f.missed);
        if (f.missed) ui.note(`${f.channel}: recovered ${f.missed} missed`);
      } else if (f.recovered === false) {
        state = "subscribed, could not recover: reload";
        ui.note(`${f.channel}: could not recover: reload`);
      }
      ui.subscription(f.channel, state);
    } else if (type === "unsubscribed") {
      ui.subscription(f.channel, `unsubscribed (${f.reason})`);
    } else if (type === "error") {
      ui.note(`error: ${f.code}: ${f.message}`);
    } else if (type === "disconnect") {
      ui.note(`disconnect: ${f.code} ${f.reason}`);
      if (!f.reconnect) {
        source.close();
        ui.state("disconnected");
      }
    }
  }

  async publish(channel: string, event: string, data: unknown): Promise<number> {
    if (!input("admin-key").value.trim()) throw new Error("over SSE, publishing goes through the HTTP API: enter the admin key");
    return ((await api("POST", "/api/ws/broadcast", { channel, type: event, message: data })) as { offset: number }).offset;
  }

  async chat(agent: string, text: string, onText: (delta: string) => void) {
    const abort = new AbortController();
    const headers: Record<string, string> = { "content-type": "application/json", accept: "text/event-stream" };
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    const body = {
      threadId: this.threadId,
      runId: crypto.randomUUID(),
      messages: [{ id: crypto.randomUUID(), role: "user", content: text }],
      tools: [],
      context: [],
      state: {},
      forwardedProps: {},
    };
    const r = await fetch(`${httpBase()}/agui/${encodeURIComponent(agent)}`, { method: "POST", headers, body: JSON.stringify(body), signal: abort.signal });
    if (!r.ok || !r.body) throw new Error(`HTTP ${r.status}: ${await r.text()}`);
    const reader = r.body.getReader();
    const done = (async () => {
      const decoder = new TextDecoder();
      let buf = "";
      let last = "";
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += decoder.decode(value, { stream: true });
          let end: number;
          while ((end = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, end);
            buf = buf.slice(end + 2);
            const data = block
              .split("\n")
              .filter((l) => l.startsWith("data:"))
              .map((l) => l.slice(5).trimStart())
              .join("\n");
            if (!data) continue;
            const e = JSON.parse(data);
            last = e.type;
            if (e.type === "TEXT_MESSAGE_CONTENT") onText(String(e.delta ?? ""));
          }
        }
      } catch (e) {
        if (abort.signal.aborted) return "stopped";
        throw e;
      }
      return last === "RUN_FINISHED" ? "finished" : last === "RUN_ERROR" ? "error" : "ended";
    })();
    return {
      // Closing the request cancels the run (SPEC §4, `POST /agui/{agent}`).
      stop: async () => abort.abort(),
      done,
    };
  }

  async stats(): Promise<unknown> {
    return input("admin-key").value.trim() ? api("GET", "/api/ws/stats") : api("GET", "/api/ws/info");
  }

  close(): void {
    this.closed = true;
    this.source?.close();
    this.source = null;
    ui.state("disconnected");
  }
}

// === Wiring ===

let transport: Transport | null = null;
let stopRun: (() => Promise<void>) | null = null;

function choose(): "websocket" | "sse" {
  const choice = el<HTMLSelectElement>("transport-choice").value;
  if (choice === "websocket" || choice === "sse") return choice;
  return typeof WebSocket === "function" ? "websocket" : "sse";
}

function connect(): void {
  transport?.close();
  const token = input("token").value.trim();
  transport = choose() === "websocket" ? new WsTransport(input("url").value.trim(), token) : new SseTransport(token);
  ui.transport(transport.name);
  for (const li of [...el("subscriptions").children]) {
    const channel = (li as HTMLElement).dataset.channel;
    if (channel) transport.subscribe(channel);
  }
}

function report(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function start(): void {
  const params = new URLSearchParams(location.search);
  const ws = location.protocol === "https:" ? "wss:" : "ws:";
  input("url").value = params.get("url") ?? `${ws}//${location.host}/ws/connect`;
  input("token").value = params.get("token") ?? "";
  input("admin-key").value = params.get("admin_key") ?? "";
  const t = params.get("transport");
  if (t === "sse" || t === "websocket") el<HTMLSelectElement>("transport-choice").value = t;

  el("connect").onclick = connect;
  el("disconnect").onclick = () => transport?.close();
  el("subscribe").onclick = () => {
    const channel = input("channel").value.trim();
    if (!channel) return;
    if (!transport) connect();
    transport!.subscribe(channel);
  };
  el("publish").onclick = async () => {
    const result = el("publish-result");
    try {
      if (!transport) connect();
      const data = JSON.parse(input("pub-data").value || "null");
      const offset = await transport!.publish(input("pub-channel").value.trim(), input("pub-event").value.trim() || "message", data);
      result.textContent = `published at offset ${offset}`;
    } catch (e) {
      result.textContent = `failed: ${report(e)}`;
    }
  };
  el("send").onclick = async () => {
    if (!transport) connect();
    const out = el("chat-text");
    out.textContent = "";
    const stop = el<HTMLButtonElement>("stop");
    const send = el<HTMLButtonElement>("send");
    send.disabled = true;
    ui.runStatus("running");
    try {
      const run = await transport!.chat(input("agent").value.trim() || "default", input("message").value, (delta) => {
        out.textContent += delta;
      });
      stopRun = run.stop;
      stop.disabled = false;
      ui.runStatus(await run.done);
    } catch (e) {
      ui.runStatus(`failed: ${report(e)}`);
    } finally {
      stop.disabled = true;
      send.disabled = false;
      stopRun = null;
    }
  };
  el("stop").onclick = async () => {
    ui.runStatus("stopping");
    try {
      await stopRun?.();
    } catch (e) {
      ui.runStatus(`stop failed: ${report(e)}`);
    }
  };
  el("refresh-stats").onclick = async () => {
    try {
      if (!transport) connect();
      el("stats").textContent = JSON.stringify(await transport!.stats(), null, 2);
    } catch (e) {
      el("stats").textContent = `failed: ${report(e)}`;
    }
  };
  if (params.get("connect") !== "0") connect();
}

start();
