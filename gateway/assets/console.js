"use strict";
(() => {
  // ../typescript/src/index.ts
  var LocalCode = {
    /** `connect()` or `disconnect()` was called. */
    CALLED: 0,
    /** No frame arrived within `heartbeat.interval + heartbeat.timeout`. */
    HEARTBEAT_TIMEOUT: 1,
    /** The connection did not open (`connected`, `authorized`) within `connectTimeout`. */
    CONNECT_TIMEOUT: 2,
    /** `getToken()` failed (not with an `UnauthorizedError`): retried. */
    TOKEN_ERROR: 3,
    /** The WebSocket could not be created. */
    TRANSPORT_ERROR: 4
  };
  var SwitchboardError = class extends Error {
    constructor(code, message) {
      super(message);
      this.name = "SwitchboardError";
      this.code = code;
    }
  };
  var UnauthorizedError = class extends SwitchboardError {
    constructor(message = "unauthorized") {
      super("unauthorized", message);
      this.name = "UnauthorizedError";
    }
  };
  var TimeoutError = class extends SwitchboardError {
    constructor(message = "timed out") {
      super("timeout", message);
      this.name = "TimeoutError";
    }
  };
  var DisconnectedError = class extends SwitchboardError {
    constructor(message = "disconnected") {
      super("disconnected", message);
      this.name = "DisconnectedError";
    }
  };
  var RpcError = class extends SwitchboardError {
    constructor(code, message) {
      super(code, message);
      this.name = "RpcError";
    }
  };
  function isUnauthorized(e) {
    return e instanceof UnauthorizedError || e?.name === "UnauthorizedError";
  }
  function asError(e) {
    return e instanceof Error ? e : new Error(String(e));
  }
  var Emitter = class {
    constructor() {
      this.handlers = /* @__PURE__ */ new Map();
    }
    /** Adds a handler; returns a function that removes it. */
    on(event, handler) {
      let set = this.handlers.get(event);
      if (!set) this.handlers.set(event, set = /* @__PURE__ */ new Set());
      set.add(handler);
      return () => this.off(event, handler);
    }
    once(event, handler) {
      const off = this.on(event, (arg) => {
        off();
        handler(arg);
      });
      return off;
    }
    off(event, handler) {
      this.handlers.get(event)?.delete(handler);
    }
    removeAllListeners(event) {
      if (event === void 0) this.handlers.clear();
      else this.handlers.delete(event);
    }
    emit(event, arg) {
      const set = this.handlers.get(event);
      if (!set) return;
      for (const handler of [...set]) {
        try {
          handler(arg);
        } catch (e) {
          setTimeout(() => {
            throw e;
          });
        }
      }
    }
  };
  var OPEN = 1;
  function tokenExpiry(token) {
    try {
      const part = token.split(".")[1];
      if (!part) return null;
      const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
      const padded = b64 + "=".repeat((4 - b64.length % 4) % 4);
      const json = JSON.parse(atob(padded));
      return typeof json.exp === "number" ? json.exp : null;
    } catch {
      return null;
    }
  }
  function backoff(attempt, min, max) {
    const cap = Math.min(max, min * Math.pow(2, Math.min(attempt, 31)));
    return Math.floor(Math.random() * cap);
  }
  function reconnectsAfter(code) {
    return !(code >= 4500 && code <= 4999);
  }
  var Client = class extends Emitter {
    constructor(url, options = {}) {
      super();
      this._state = "disconnected";
      this.ws = null;
      /** Increases with every transport, so that late callbacks of an old one are ignored. */
      this.generation = 0;
      this.attempts = 0;
      this.connects = 0;
      this.nextId = 1;
      this.pending = /* @__PURE__ */ new Map();
      /** Calls waiting for the connection. */
      this.queued = [];
      this.subs = /* @__PURE__ */ new Map();
      this.runs = /* @__PURE__ */ new Map();
      /** Whether the token of the current connect came from `getToken()` just now. */
      this.tokenFetched = false;
      /** The server's `disconnect` frame on the current transport. */
      this.farewell = null;
      this.lastFrameAt = 0;
      this.windowMs = 0;
      this.info = null;
      /** Requests whose reply was a `run`: a later `error` with the same id belongs to that run. */
      this.runByRequest = /* @__PURE__ */ new Map();
      this.url = url;
      const given = Object.fromEntries(Object.entries(options).filter(([, v]) => v !== void 0));
      this.opts = {
        minReconnectDelay: 500,
        maxReconnectDelay: 2e4,
        timeout: 1e4,
        connectTimeout: 1e4,
        refreshMargin: 1e4,
        ...given
      };
      const Ctor = options.WebSocket ?? globalThis.WebSocket;
      if (!Ctor) {
        throw new TypeError('no WebSocket: pass `WebSocket` in the options (in Node 20, `import WebSocket from "ws"`)');
      }
      this.Ctor = Ctor;
      this.token = options.token ?? null;
      this.tokenExp = this.token ? tokenExpiry(this.token) : null;
    }
    get state() {
      return this._state;
    }
    /** What the server said when this connection opened; null when not connected. */
    get connection() {
      return this._state === "connected" ? this.info : null;
    }
    /** Connects, and keeps reconnecting until `disconnect()` or a close that says not to. */
    connect() {
      if (this._state !== "disconnected") return;
      this.attempts = 0;
      this.setState("connecting");
      this.emit("connecting", { code: LocalCode.CALLED, reason: "connect called", reconnect: true });
      void this.open();
    }
    /** Closes the connection and stops reconnecting; subscriptions resubscribe on the next `connect()`. */
    disconnect() {
      this.stop({ code: LocalCode.CALLED, reason: "disconnect called", reconnect: false });
    }
    /**
     * Resolves once connected; rejects if the client ends up disconnected
     * (with the reason, such as an `UnauthorizedError`) or after `timeout` ms.
     */
    ready(timeout) {
      if (this._state === "connected") return Promise.resolve();
      if (this._state === "disconnected") return Promise.reject(new DisconnectedError("the client is disconnected; call connect()"));
      return new Promise((resolve, reject) => {
        let timer;
        const done = () => {
          offConnected();
          offDisconnected();
          if (timer) clearTimeout(timer);
        };
        const offConnected = this.on("connected", () => {
          done();
          resolve();
        });
        const offDisconnected = this.on("disconnected", (ctx) => {
          done();
          reject(ctx.error ?? new DisconnectedError(ctx.reason));
        });
        if (timeout !== void 0) {
          timer = setTimeout(() => {
            done();
            reject(new TimeoutError(`not connected within ${timeout} ms`));
          }, timeout);
        }
      });
    }
    // --- Subscriptions ---
    /** Creates a subscription (not yet subscribed: call `subscribe()`). One per channel. */
    newSubscription(channel, options = {}) {
      if (this.subs.has(channel)) throw new Error(`a subscription to ${JSON.stringify(channel)} exists; use getSubscription`);
      const sub = new Subscription(this, channel, options);
      this.subs.set(channel, sub);
      return sub;
    }
    getSubscription(channel) {
      return this.subs.get(channel);
    }
    subscriptions() {
      return [...this.subs.values()];
    }
    /** Unsubscribes and forgets a subscription. */
    removeSubscription(sub) {
      sub.unsubscribe();
      if (this.subs.get(sub.channel) === sub) this.subs.delete(sub.channel);
    }
    // --- Calls ---
    /** Publishes to a channel whose namespace allows client publishing. */
    async publish(channel, event, data, options = {}) {
      const reply = await this.call({ type: "publish", channel, event, data }, ["published"], options.timeout ?? this.opts.timeout);
      return { channel: reply.channel, offset: reply.offset, eventId: reply.event_id };
    }
    /** Calls a method on the agent bridge; rejects with an `RpcError` when the answer is an error. */
    async rpc(method, params = {}, options = {}) {
      const reply = await this.call({ type: "rpc", method, params }, ["rpc_response"], options.timeout ?? this.opts.timeout);
      if (reply.error) throw new RpcError(String(reply.error.code), String(reply.error.message ?? reply.error.code));
      return reply.result;
    }
    /**
     * Starts a run with a new user message; resolves with the run once the
     * server accepted it. Iterate the run (`for await (const e of run)`) for
     * its AG-UI events; after a reconnect it resumes from the thread channel.
     */
    async chat(content, options = {}) {
      const frame = { type: "chat_message", content };
      if (options.agent !== void 0) frame.agent = options.agent;
      if (options.threadId !== void 0) frame.thread_id = options.threadId;
      if (options.state !== void 0) frame.state = options.state;
      if (options.tools !== void 0) frame.tools = options.tools;
      if (options.context !== void 0) frame.context = options.context;
      if (options.multitask !== void 0) frame.multitask = options.multitask;
      if (options.onDisconnect !== void 0) frame.on_disconnect = options.onDisconnect;
      const timeout = options.timeout ?? (options.multitask === "enqueue" ? 0 : this.opts.timeout);
      return this.startRun(frame, timeout);
    }
    /** Starts a run with a full AG-UI `RunAgentInput`. */
    async runAgent(agent, input2, options = {}) {
      const frame = { type: "run_agent", agent, input: input2 };
      if (options.multitask !== void 0) frame.multitask = options.multitask;
      if (options.onDisconnect !== void 0) frame.on_disconnect = options.onDisconnect;
      const timeout = options.timeout ?? (options.multitask === "enqueue" ? 0 : this.opts.timeout);
      return this.startRun(frame, timeout);
    }
    /** Stops a run (by run id), or every run of a thread (`{ threadId }`). */
    async interrupt(target, options = {}) {
      const t = typeof target === "string" ? { runId: target } : target;
      const frame = { type: "interrupt_stream" };
      if (t.runId) frame.run_id = t.runId;
      if (t.threadId) frame.thread_id = t.threadId;
      const reply = await this.call(frame, ["interrupted"], options.timeout ?? this.opts.timeout);
      return { runId: reply.run_id ?? null, threadId: reply.thread_id ?? null, cancelled: !!reply.cancelled };
    }
    /** Runs this client follows (started here, not yet ended). */
    activeRuns() {
      return [...this.runs.values()];
    }
    async startRun(frame, timeout) {
      let run;
      await this.call(frame, ["run"], timeout, (reply) => {
        run = new Run(this, reply);
        this.runs.set(run.runId, run);
        if (reply.id !== void 0) this.runByRequest.set(reply.id, run);
      });
      return run;
    }
    /**
     * Sends a frame with an id and resolves with the reply of one of `types`;
     * an `error` reply rejects with a `SwitchboardError`. Waits for the
     * connection when there is none (within the timeout); a timeout of 0 is none.
     */
    call(frame, types, timeout, onAccept) {
      return new Promise((resolve, reject) => {
        if (this._state === "disconnected") {
          reject(new DisconnectedError("the client is disconnected; call connect()"));
          return;
        }
        const id = this.nextId++;
        const p = {
          frame: { ...frame, id },
          sentOn: null,
          onReply: (reply) => {
            this.settle(id, p);
            if (reply.type === "error") {
              reject(errorOf(reply));
            } else if (types.includes(reply.type)) {
              onAccept?.(reply);
              resolve(reply);
            } else {
              reject(new SwitchboardError("internal", `unexpected reply ${reply.type} to ${frame.type}`));
            }
          },
          onFail: (error) => {
            this.settle(id, p);
            reject(error);
          }
        };
        if (timeout > 0) {
          p.timer = setTimeout(() => p.onFail(new TimeoutError(`${frame.type} got no answer within ${timeout} ms`)), timeout);
        }
        this.pending.set(id, p);
        if (this._state === "connected") this.sendPending(p);
        else this.queued.push(p);
      });
    }
    settle(id, p) {
      if (p.timer) clearTimeout(p.timer);
      this.pending.delete(id);
      const i = this.queued.indexOf(p);
      if (i >= 0) this.queued.splice(i, 1);
    }
    sendPending(p) {
      p.sentOn = this.generation;
      if (!this.send(p.frame)) p.onFail(new DisconnectedError("the connection closed before the frame was sent"));
    }
    /** @internal Sends a frame on the current transport; returns false when it could not. */
    send(frame) {
      const ws = this.ws;
      if (!ws || ws.readyState !== OPEN) return false;
      try {
        ws.send(JSON.stringify(frame));
        return true;
      } catch (e) {
        this.emit("error", { type: "transport", error: asError(e) });
        return false;
      }
    }
    /** @internal Sends a frame with a fresh id on the current connection; `onReply` gets its reply. */
    request(frame, onReply) {
      const id = this.nextId++;
      const p = {
        frame: { ...frame, id },
        sentOn: this.generation,
        onReply: (reply) => {
          this.pending.delete(id);
          onReply(reply);
        },
        // Internal requests (subscribe, unsubscribe) are redone after a reconnect by their owner.
        onFail: () => this.pending.delete(id)
      };
      this.pending.set(id, p);
      if (!this.send(p.frame)) {
        this.pending.delete(id);
        return false;
      }
      return true;
    }
    // --- Connection ---
    log(message, ...args) {
      this.opts.debug?.(message, ...args);
    }
    setState(state) {
      if (state === this._state) return;
      const previous = this._state;
      this._state = state;
      this.log(`state ${previous} -> ${state}`);
      this.emit("state", { state, previous });
    }
    /** The token for a new connection: the current one unless it is about to expire. */
    async tokenForConnect() {
      this.tokenFetched = false;
      if (!this.opts.getToken) return this.token;
      const fresh = this.tokenExp === null || this.tokenExp * 1e3 - Date.now() > this.opts.refreshMargin;
      if (this.token && fresh) return this.token;
      const token = await this.opts.getToken();
      this.setToken(token);
      this.tokenFetched = true;
      return token;
    }
    setToken(token) {
      if (typeof token !== "string" || !token) throw new SwitchboardError("token", "getToken() returned no token");
      this.token = token;
      this.tokenExp = tokenExpiry(token);
    }
    async open() {
      const generation = ++this.generation;
      this.farewell = null;
      let token;
      try {
        token = await this.tokenForConnect();
      } catch (e) {
        if (generation !== this.generation || this._state !== "connecting") return;
        if (isUnauthorized(e)) {
          this.stop({ code: 4500, reason: "getToken refused", reconnect: false, error: asError(e) });
        } else {
          this.emit("error", { type: "token", error: asError(e) });
          this.retry({ code: LocalCode.TOKEN_ERROR, reason: `getToken failed: ${asError(e).message}`, reconnect: true });
        }
        return;
      }
      if (generation !== this.generation || this._state !== "connecting") return;
      let ws;
      try {
        ws = new this.Ctor(this.url);
      } catch (e) {
        this.emit("error", { type: "transport", error: asError(e) });
        this.retry({ code: LocalCode.TRANSPORT_ERROR, reason: `cannot create a WebSocket: ${asError(e).message}`, reconnect: true });
        return;
      }
      this.ws = ws;
      this.connectTimer = setTimeout(() => {
        if (generation !== this.generation) return;
        this.lost({ code: LocalCode.CONNECT_TIMEOUT, reason: "connect timeout", reconnect: true });
      }, this.opts.connectTimeout);
      ws.onmessage = (ev) => {
        if (generation !== this.generation) return;
        this.onData(ev.data, token);
      };
      ws.onclose = (ev) => {
        if (generation !== this.generation) return;
        const code = typeof ev?.code === "number" ? ev.code : 1006;
        const reason = ev?.reason || (code === 1006 ? "connection lost" : "closed");
        const bye = this.farewell;
        const ctx = bye ? { code: bye.code, reason: bye.reason, reconnect: bye.reconnect } : { code, reason, reconnect: reconnectsAfter(code) };
        if (ctx.code === 4500) ctx.error = new UnauthorizedError(ctx.reason);
        this.lost(ctx);
      };
      ws.onerror = (ev) => {
        if (generation !== this.generation) return;
        const message = ev?.message ?? "WebSocket error";
        this.emit("error", { type: "transport", error: new Error(message) });
      };
    }
    onData(data, token) {
      this.lastFrameAt = Date.now();
      let text;
      if (typeof data === "string") text = data;
      else if (data instanceof ArrayBuffer) text = new TextDecoder().decode(data);
      else if (ArrayBuffer.isView(data)) text = new TextDecoder().decode(data);
      else return;
      let frame;
      try {
        frame = JSON.parse(text);
      } catch (e) {
        this.emit("error", { type: "frame", error: new SwitchboardError("invalid_json", `a frame that is not JSON: ${asError(e).message}`) });
        return;
      }
      if (!frame || typeof frame !== "object" || typeof frame.type !== "string") return;
      this.onFrame(frame, token);
    }
    onFrame(frame, token) {
      if (frame.id !== void 0 && frame.id !== null) {
        const p = this.pending.get(frame.id);
        if (p) {
          p.onReply(frame);
          return;
        }
        const run = this.runByRequest.get(frame.id);
        if (run && frame.type === "error") {
          run.fail(errorOf(frame));
          return;
        }
        if (frame.type !== "event") return;
      }
      switch (frame.type) {
        case "connected":
          this.onConnectedFrame(frame, token);
          break;
        case "ping":
          this.send({ type: "pong" });
          this.emit("ping", { timestamp: frame.timestamp });
          break;
        case "event":
          this.onEvent(frame);
          break;
        case "agent_event": {
          const run = this.runs.get(frame.run_id);
          if (run) run.push(frame.seq, frame.event);
          break;
        }
        case "subscribed": {
          const sub = this.subs.get(frame.channel);
          if (sub) sub.serverSubscribed(frame);
          else this.emit("serverSubscribed", { channel: frame.channel, position: frame.position });
          break;
        }
        case "unsubscribed":
          this.subs.get(frame.channel)?.serverUnsubscribed(frame.reason ?? "server");
          break;
        case "disconnect":
          this.farewell = { code: frame.code, reason: String(frame.reason ?? ""), reconnect: !!frame.reconnect };
          break;
        case "error":
          this.emit("error", { type: "server", error: errorOf(frame) });
          break;
        default:
          break;
      }
    }
    onConnectedFrame(frame, token) {
      const hb = frame.heartbeat ?? {};
      this.info = {
        connectionId: frame.connection_id,
        userId: frame.user_id ?? null,
        node: frame.node ?? null,
        heartbeat: { interval: Number(hb.interval ?? 30), timeout: Number(hb.timeout ?? 10) },
        limits: frame.limits ?? {},
        expiresAt: null,
        reconnects: this.connects
      };
      this.windowMs = (this.info.heartbeat.interval + this.info.heartbeat.timeout) * 1e3;
      this.armWatchdog();
      if (!token) {
        this.established();
        return;
      }
      const generation = this.generation;
      const sent = this.request({ type: "authorize", token }, (reply) => {
        if (generation !== this.generation) return;
        if (reply.type === "authorized") {
          this.info.userId = reply.user_id ?? this.info.userId;
          this.info.expiresAt = reply.expires_at ?? null;
          this.established();
        } else if (reply.code === "unauthorized" && this.opts.getToken && !this.tokenFetched) {
          this.token = null;
          this.tokenExp = null;
          this.lost({ code: 4500, reason: `token refused, getting a new one: ${reply.message}`, reconnect: true });
        } else {
          const error = reply.code === "unauthorized" ? new UnauthorizedError(String(reply.message ?? "unauthorized")) : errorOf(reply);
          this.stop({ code: 4500, reason: error.message, reconnect: false, error });
        }
      });
      if (!sent) this.lost({ code: 1006, reason: "connection lost", reconnect: true });
    }
    /** The connection is usable: subscriptions, queued calls and runs go on. */
    established() {
      if (this.connectTimer) clearTimeout(this.connectTimer);
      this.connectTimer = void 0;
      this.attempts = 0;
      const info = this.info;
      this.connects++;
      this.setState("connected");
      this.emit("connected", info);
      this.scheduleRefresh(info.expiresAt);
      for (const sub of this.subs.values()) sub.connected();
      for (const p of this.queued.splice(0)) this.sendPending(p);
      for (const run of this.runs.values()) run.connected();
    }
    armWatchdog() {
      if (this.watchdog) clearTimeout(this.watchdog);
      const generation = this.generation;
      const check = () => {
        if (generation !== this.generation) return;
        const idle = Date.now() - this.lastFrameAt;
        if (idle >= this.windowMs) {
          this.log(`no frame for ${idle} ms`);
          this.lost({ code: LocalCode.HEARTBEAT_TIMEOUT, reason: "no frame within heartbeat interval + timeout", reconnect: true });
        } else {
          this.watchdog = setTimeout(check, this.windowMs - idle + 5);
        }
      };
      this.watchdog = setTimeout(check, this.windowMs);
    }
    scheduleRefresh(expiresAt) {
      if (this.refreshTimer) clearTimeout(this.refreshTimer);
      this.refreshTimer = void 0;
      if (expiresAt === null || !this.opts.getToken) return;
      const remaining = expiresAt * 1e3 - Date.now();
      const delay = Math.max(0, remaining - this.opts.refreshMargin, remaining / 2);
      const generation = this.generation;
      this.refreshTimer = setTimeout(() => void this.refresh(generation, expiresAt, 0), delay);
    }
    async refresh(generation, expiresAt, failures) {
      if (generation !== this.generation || this._state !== "connected") return;
      let token;
      try {
        const t = await this.opts.getToken();
        if (generation !== this.generation || this._state !== "connected") return;
        this.setToken(t);
        token = t;
      } catch (e) {
        if (generation !== this.generation || this._state !== "connected") return;
        if (isUnauthorized(e)) {
          this.stop({ code: 4500, reason: "getToken refused", reconnect: false, error: asError(e) });
          return;
        }
        this.emit("error", { type: "refresh", error: asError(e) });
        const delay = backoff(failures, this.opts.minReconnectDelay, this.opts.maxReconnectDelay);
        if (expiresAt * 1e3 > Date.now()) {
          this.refreshTimer = setTimeout(() => void this.refresh(generation, expiresAt, failures + 1), delay);
        }
        return;
      }
      this.request({ type: "refresh", token }, (reply) => {
        if (generation !== this.generation) return;
        if (reply.type === "authorized") {
          const exp = reply.expires_at ?? null;
          if (this.info) this.info.expiresAt = exp;
          this.emit("refreshed", { expiresAt: exp });
          this.scheduleRefresh(exp);
        } else {
          const error = reply.code === "unauthorized" ? new UnauthorizedError(String(reply.message ?? "unauthorized")) : errorOf(reply);
          this.emit("error", { type: "refresh", error });
          this.stop({ code: 4500, reason: `refresh refused: ${error.message}`, reconnect: false, error });
        }
      });
    }
    clearTimers() {
      for (const t of [this.reconnectTimer, this.connectTimer, this.watchdog, this.refreshTimer]) if (t) clearTimeout(t);
      this.reconnectTimer = this.connectTimer = this.watchdog = this.refreshTimer = void 0;
    }
    /** Drops the current transport (without waiting for its close handshake). */
    dropTransport(hard) {
      const ws = this.ws;
      this.ws = null;
      this.generation++;
      if (!ws) return;
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      ws.onerror = () => {
      };
      try {
        if (ws.readyState <= OPEN) ws.close(1e3, "client closing");
      } catch {
      }
      const terminate = ws.terminate;
      if (hard && typeof terminate === "function") {
        try {
          terminate.call(ws);
        } catch {
        }
      }
    }
    /** The transport is gone: fail what was in flight, then reconnect or stop as `ctx` says. */
    lost(ctx) {
      this.log(`lost: ${ctx.code} ${ctx.reason} (reconnect: ${ctx.reconnect})`);
      const generation = this.generation;
      this.dropTransport(true);
      this.clearTimers();
      for (const [id, p] of [...this.pending]) {
        if (p.sentOn === generation) p.onFail(new DisconnectedError(`the connection was lost (${ctx.code} ${ctx.reason})`));
        else if (p.sentOn !== null) this.pending.delete(id);
      }
      for (const sub of this.subs.values()) sub.disconnected(ctx);
      if (ctx.reconnect && this._state !== "disconnected") this.retry(ctx);
      else this.stop(ctx);
    }
    retry(ctx) {
      this.setState("connecting");
      this.emit("connecting", ctx);
      const delay = backoff(this.attempts++, this.opts.minReconnectDelay, this.opts.maxReconnectDelay);
      this.log(`reconnecting in ${delay} ms`);
      if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
      this.reconnectTimer = setTimeout(() => {
        this.reconnectTimer = void 0;
        if (this._state === "connecting") void this.open();
      }, delay);
    }
    stop(ctx) {
      const wasDisconnected = this._state === "disconnected";
      this.dropTransport(false);
      this.clearTimers();
      for (const p of [...this.pending.values()]) p.onFail(ctx.error ?? new DisconnectedError(ctx.reason));
      this.pending.clear();
      this.queued = [];
      for (const sub of this.subs.values()) sub.disconnected(ctx);
      const error = ctx.error ?? new DisconnectedError(`disconnected: ${ctx.reason}`);
      for (const run of [...this.runs.values()]) run.fail(error);
      if (wasDisconnected) return;
      this.setState("disconnected");
      this.emit("disconnected", { ...ctx, reconnect: false });
    }
    onEvent(frame) {
      const sub = this.subs.get(frame.channel);
      let delivered = false;
      if (sub) delivered = sub.event(frame);
      else {
        delivered = true;
        this.emit("publication", toEvent(frame, false));
      }
      if (delivered && frame.channel.startsWith("thread:")) {
        const data = frame.data;
        const run = data?.run_id ? this.runs.get(data.run_id) : void 0;
        if (run && typeof data.seq === "number" && data.event) run.push(data.seq, data.event);
      }
    }
    /** @internal A run ended: forget it. */
    runEnded(run) {
      if (this.runs.get(run.runId) === run) this.runs.delete(run.runId);
      for (const [id, r] of this.runByRequest) if (r === run) this.runByRequest.delete(id);
    }
    /** @internal */
    get backoffOptions() {
      return { min: this.opts.minReconnectDelay, max: this.opts.maxReconnectDelay };
    }
    /** @internal Creates the subscription a run resumes from, when none exists. */
    resumeSubscription(channel, since) {
      if (this.subs.has(channel)) return null;
      const sub = this.newSubscription(channel, { since });
      sub.internal = true;
      return sub;
    }
  };
  function errorOf(frame) {
    const code = String(frame.code ?? "internal");
    const message = String(frame.message ?? code);
    return code === "unauthorized" ? new UnauthorizedError(message) : new SwitchboardError(code, message);
  }
  function toEvent(frame, replayed) {
    return {
      channel: frame.channel,
      event: frame.event,
      data: frame.data,
      id: frame.id,
      offset: frame.offset,
      epoch: frame.epoch,
      timestamp: frame.timestamp,
      replayed
    };
  }
  var TRANSIENT = /* @__PURE__ */ new Set(["unavailable", "rate_limited", "internal"]);
  var Subscription = class extends Emitter {
    /** @internal Use `client.newSubscription`. */
    constructor(client, channel, options) {
      super();
      this.client = client;
      this._state = "unsubscribed";
      /** The user wants it subscribed. */
      this.wanted = false;
      /** Counts subscribe requests, so that replies to stale ones are ignored. */
      this.attempt = 0;
      this.everSubscribed = false;
      this.replayLeft = 0;
      this.retries = 0;
      /** @internal Created by a run to resume from; removed when the run ends. */
      this.internal = false;
      this.channel = channel;
      this._position = options.since ? { ...options.since } : null;
      this.recover = options.recover ?? true;
    }
    get state() {
      return this._state;
    }
    /** The last position seen (the last event's, or the one `subscribed` gave); null before any. */
    get position() {
      return this._position ? { ...this._position } : null;
    }
    subscribe() {
      if (this.wanted) return;
      this.wanted = true;
      this.setState("subscribing");
      this.emit("subscribing", { reason: "subscribe called" });
      if (this.client.state === "connected") this.send();
    }
    unsubscribe() {
      const was = this._state;
      this.wanted = false;
      this.attempt++;
      if (this.retryTimer) clearTimeout(this.retryTimer);
      if (was === "unsubscribed") return;
      if (this.client.state === "connected") this.client.request({ type: "unsubscribe", channel: this.channel }, () => {
      });
      this.setState("unsubscribed");
      this.emit("unsubscribed", { reason: "client" });
    }
    /** Resolves once subscribed; rejects if the subscription ends unsubscribed, or after `timeout` ms. */
    ready(timeout) {
      if (this._state === "subscribed") return Promise.resolve();
      if (this._state === "unsubscribed") return Promise.reject(new SwitchboardError("unsubscribed", "the subscription is not subscribing"));
      return new Promise((resolve, reject) => {
        let timer;
        const done = () => {
          a();
          b();
          if (timer) clearTimeout(timer);
        };
        const a = this.on("subscribed", () => {
          done();
          resolve();
        });
        const b = this.on("unsubscribed", (ctx) => {
          done();
          reject(ctx.error ?? new SwitchboardError("unsubscribed", `unsubscribed (${ctx.reason})`));
        });
        if (timeout !== void 0) {
          timer = setTimeout(() => {
            done();
            reject(new TimeoutError(`not subscribed within ${timeout} ms`));
          }, timeout);
        }
      });
    }
    setState(state) {
      if (state === this._state) return;
      const previous = this._state;
      this._state = state;
      this.emit("state", { state, previous });
    }
    send() {
      const attempt = ++this.attempt;
      const since = this.recover && this._position ? { ...this._position } : void 0;
      const frame = { type: "subscribe", channel: this.channel };
      if (since) frame.since = since;
      const resubscribed = this.everSubscribed;
      this.client.request(frame, (reply) => {
        if (attempt !== this.attempt || !this.wanted) return;
        if (reply.type === "subscribed") {
          this.subscribed(reply, since, resubscribed);
        } else if (reply.type === "error") {
          this.refused(errorOf(reply));
        }
      });
    }
    subscribed(reply, since, resubscribed) {
      const position = reply.position;
      this.retries = 0;
      this.everSubscribed = true;
      this.replayLeft = Number(reply.missed ?? 0);
      this._position = { offset: position.offset, epoch: position.epoch };
      if (since && reply.recovered) {
        this._position = { ...since };
      }
      this.setState("subscribed");
      const ctx = {
        channel: this.channel,
        position: { ...position },
        recovering: !!since,
        missed: this.replayLeft,
        resubscribed
      };
      if (since) ctx.recovered = !!reply.recovered;
      this.emit("subscribed", ctx);
      if (since && !reply.recovered) this.emit("reload", { channel: this.channel, since, position: { ...position } });
    }
    refused(error) {
      if (error.code === "already_subscribed") {
        this.setState("subscribed");
        this.emit("subscribed", {
          channel: this.channel,
          position: this.position ?? { offset: 0, epoch: "" },
          recovering: false,
          missed: 0,
          resubscribed: this.everSubscribed
        });
        return;
      }
      this.emit("error", { error });
      if (TRANSIENT.has(error.code)) {
        const { min, max } = this.client.backoffOptions;
        const attempt = this.attempt;
        this.retryTimer = setTimeout(() => {
          if (attempt === this.attempt && this.wanted && this.client.state === "connected") this.send();
        }, backoff(this.retries++, min, max));
        return;
      }
      this.wanted = false;
      this.setState("unsubscribed");
      this.emit("unsubscribed", { reason: "error", error });
    }
    /** @internal Routes an event; returns whether it was delivered (not a duplicate, subscribed). */
    event(frame) {
      if (this._state !== "subscribed") return false;
      const p = this._position;
      if (p && p.epoch === frame.epoch && frame.offset <= p.offset) return false;
      this._position = { offset: frame.offset, epoch: frame.epoch };
      const replayed = this.replayLeft > 0;
      if (replayed) this.replayLeft--;
      this.emit("event", toEvent(frame, replayed));
      return true;
    }
    /** @internal */
    connected() {
      if (this.wanted) this.send();
    }
    /** @internal */
    disconnected(ctx) {
      this.attempt++;
      if (this.retryTimer) clearTimeout(this.retryTimer);
      if (!this.wanted || this._state !== "subscribed") return;
      this.setState("subscribing");
      this.emit("subscribing", { reason: ctx.reason, code: ctx.code });
    }
    /** @internal A `subscribed` frame without an id. */
    serverSubscribed(frame) {
      if (!this.wanted || this._state === "subscribed") return;
      this._position = frame.position;
      this.setState("subscribed");
      this.emit("subscribed", { channel: this.channel, position: frame.position, recovering: false, missed: 0, resubscribed: this.everSubscribed });
    }
    /** @internal The server ended the subscription. */
    serverUnsubscribed(reason) {
      if (this._state === "unsubscribed") return;
      this.wanted = false;
      this.attempt++;
      this.setState("unsubscribed");
      this.emit("unsubscribed", { reason });
    }
  };
  var Run = class {
    /** @internal Created by `client.chat`. */
    constructor(client, frame) {
      this.client = client;
      /** Every event so far, in `seq` order. */
      this.events = [];
      this.lastSeq = 0;
      this.ended = false;
      this.error = null;
      this.wake = [];
      this.resumeSub = null;
      this.runId = frame.run_id;
      this.threadId = frame.thread_id;
      this.channel = frame.channel;
      this.position = frame.position;
      this.done = new Promise((resolve, reject) => {
        this.resolveDone = resolve;
        this.rejectDone = reject;
      });
      this.done.catch(() => {
      });
    }
    /** `running`, `finished` (`RUN_FINISHED`), `error` (`RUN_ERROR`), or `failed` (could not be followed). */
    get status() {
      if (this.error) return "failed";
      if (!this.ended) return "running";
      return this.events[this.events.length - 1]?.type === "RUN_FINISHED" ? "finished" : "error";
    }
    /** The text of the run's text messages so far. */
    get text() {
      return this.events.filter((e) => e.type === "TEXT_MESSAGE_CONTENT").map((e) => String(e.delta ?? "")).join("");
    }
    /** Stops the run. */
    interrupt() {
      return this.client.interrupt(this.runId);
    }
    [Symbol.asyncIterator]() {
      let i = 0;
      return {
        next: async () => {
          for (; ; ) {
            if (i < this.events.length) return { value: this.events[i++], done: false };
            if (this.error) throw this.error;
            if (this.ended) return { value: void 0, done: true };
            await new Promise((resolve) => this.wake.push(resolve));
          }
        },
        return: async () => {
          i = Infinity;
          return { value: void 0, done: true };
        }
      };
    }
    notify() {
      for (const w of this.wake.splice(0)) w();
    }
    /** @internal An event of the run, from its `agent_event` or its thread channel. */
    push(seq, event) {
      if (this.ended || this.error || seq <= this.lastSeq) return;
      this.lastSeq = seq;
      this.events.push(event);
      if (event.type === "RUN_FINISHED" || event.type === "RUN_ERROR") {
        this.ended = true;
        this.cleanup();
        this.resolveDone(event);
      }
      this.notify();
    }
    /** @internal The run cannot be followed any more. */
    fail(error) {
      if (this.ended || this.error) return;
      this.error = error;
      this.cleanup();
      this.rejectDone(error);
      this.notify();
    }
    /** @internal The client (re)connected: after a reconnect, follow the thread channel. */
    connected() {
      if (this.ended || this.error || this.resumeSub) return;
      const sub = this.client.resumeSubscription(this.channel, this.position);
      if (!sub) return;
      this.resumeSub = sub;
      sub.on(
        "reload",
        () => this.fail(new SwitchboardError("unrecoverable_position", `the run's events on ${this.channel} can no longer be recovered`))
      );
      sub.on("unsubscribed", (ctx) => {
        if (ctx.error) this.fail(ctx.error);
      });
      sub.subscribe();
    }
    cleanup() {
      this.client.runEnded(this);
      const sub = this.resumeSub;
      this.resumeSub = null;
      if (sub) this.client.removeSubscription(sub);
    }
  };

  // src/console.ts
  function el(id) {
    const e = document.getElementById(id);
    if (!e) throw new Error(`no #${id}`);
    return e;
  }
  var input = (id) => el(id);
  var ui = {
    state(state) {
      const s = el("state");
      s.textContent = state;
      s.dataset.state = state;
    },
    reconnects(n) {
      el("reconnects").textContent = String(n);
    },
    transport(name) {
      el("transport").textContent = name;
    },
    user(id) {
      el("user").textContent = id ? `user ${id}` : "";
    },
    /** A line in the event log. */
    event(e) {
      const li = document.createElement("li");
      li.dataset.channel = e.channel;
      li.dataset.offset = String(e.offset);
      li.dataset.event = e.event;
      if (e.replayed) li.classList.add("replayed");
      li.textContent = `${e.channel} #${e.offset} ${e.event} ${JSON.stringify(e.data)}${e.replayed ? " (recovered)" : ""}`;
      append(li);
    },
    note(text) {
      const li = document.createElement("li");
      li.className = "note";
      li.textContent = text;
      append(li);
    },
    /** A subscription's line: its state and what its last `subscribed` said. */
    subscription(channel, state) {
      const list = el("subscriptions");
      let li = [...list.children].find((c) => c.dataset.channel === channel);
      if (!li) {
        li = document.createElement("li");
        li.dataset.channel = channel;
        list.append(li);
      }
      li.dataset.state = state;
      li.textContent = `${channel}: ${state}`;
    },
    runStatus(text) {
      el("run-status").textContent = text;
    }
  };
  function append(li) {
    const log = el("events");
    log.append(li);
    while (log.children.length > 500) log.firstElementChild.remove();
    log.scrollTop = log.scrollHeight;
  }
  function httpBase() {
    return location.origin;
  }
  async function api(method, path, body) {
    const headers = { "content-type": "application/json" };
    const key = input("admin-key").value.trim();
    if (key) headers.authorization = `Bearer ${key}`;
    const r = await fetch(httpBase() + path, { method, headers, body: body === void 0 ? void 0 : JSON.stringify(body) });
    const json = await r.json().catch(() => null);
    if (!r.ok) throw new Error(json?.error ? `${json.error.code}: ${json.error.message}` : `HTTP ${r.status}`);
    return json;
  }
  var WsTransport = class {
    constructor(url, token) {
      this.name = "websocket";
      this.client = new Client(url, { token: token || void 0, maxReconnectDelay: 5e3 });
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
    subscribe(channel) {
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
    async publish(channel, event, data) {
      if (input("admin-key").value.trim()) return (await api("POST", "/api/ws/broadcast", { channel, type: event, message: data })).offset;
      return (await this.client.publish(channel, event, data)).offset;
    }
    async chat(agent, text, onText) {
      const run = await this.client.chat(text, { agent, threadId: this.threadId });
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
        done
      };
    }
    async stats() {
      if (input("admin-key").value.trim()) return api("GET", "/api/ws/stats");
      return this.client.rpc("get_status", {});
    }
    close() {
      this.client.disconnect();
    }
  };
  var SSE_TYPES = ["event", "subscribed", "unsubscribed", "error", "disconnect"];
  var SseTransport = class {
    constructor(token) {
      this.token = token;
      this.name = "sse";
      this.source = null;
      this.channels = [];
      /** The last cursor (`id:`) received, handed to the next stream when channels change. */
      this.cursor = "";
      this.reconnects = 0;
      this.everOpen = false;
      this.threadId = crypto.randomUUID();
      this.closed = false;
      this.seen = /* @__PURE__ */ new Map();
      /** Missed events still to come per channel, as its `subscribed` said. */
      this.replay = /* @__PURE__ */ new Map();
      this.open();
    }
    subscribe(channel) {
      if (this.channels.includes(channel)) return;
      this.channels.push(channel);
      ui.subscription(channel, "subscribing");
      this.open();
    }
    /** (Re)opens the stream for every channel, from the last cursor. */
    open() {
      this.source?.close();
      const q = new URLSearchParams();
      for (const c of this.channels) q.append("channel", c);
      if (this.token) q.set("token", this.token);
      if (this.cursor) q.set("last_event_id", this.cursor);
      ui.state("connecting");
      const source = new EventSource(`${httpBase()}/sse?${q}`);
      this.source = source;
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
        if (source.readyState === EventSource.CLOSED) {
          ui.state("disconnected");
          ui.note("the server refused the stream");
        } else {
          ui.state("connecting");
          for (const c of this.channels) ui.subscription(c, "subscribing");
        }
      };
      for (const type of SSE_TYPES) source.addEventListener(type, (m) => this.message(source, type, m));
    }
    message(source, type, m) {
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
    async publish(channel, event, data) {
      if (!input("admin-key").value.trim()) throw new Error("over SSE, publishing goes through the HTTP API: enter the admin key");
      return (await api("POST", "/api/ws/broadcast", { channel, type: event, message: data })).offset;
    }
    async chat(agent, text, onText) {
      const abort = new AbortController();
      const headers = { "content-type": "application/json", accept: "text/event-stream" };
      if (this.token) headers.authorization = `Bearer ${this.token}`;
      const body = {
        threadId: this.threadId,
        runId: crypto.randomUUID(),
        messages: [{ id: crypto.randomUUID(), role: "user", content: text }],
        tools: [],
        context: [],
        state: {},
        forwardedProps: {}
      };
      const r = await fetch(`${httpBase()}/agui/${encodeURIComponent(agent)}`, { method: "POST", headers, body: JSON.stringify(body), signal: abort.signal });
      if (!r.ok || !r.body) throw new Error(`HTTP ${r.status}: ${await r.text()}`);
      const reader = r.body.getReader();
      const done = (async () => {
        const decoder = new TextDecoder();
        let buf = "";
        let last = "";
        try {
          for (; ; ) {
            const { value, done: done2 } = await reader.read();
            if (done2) break;
            buf += decoder.decode(value, { stream: true });
            let end;
            while ((end = buf.indexOf("\n\n")) >= 0) {
              const block = buf.slice(0, end);
              buf = buf.slice(end + 2);
              const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
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
        done
      };
    }
    async stats() {
      return input("admin-key").value.trim() ? api("GET", "/api/ws/stats") : api("GET", "/api/ws/info");
    }
    close() {
      this.closed = true;
      this.source?.close();
      this.source = null;
      ui.state("disconnected");
    }
  };
  var transport = null;
  var stopRun = null;
  function choose() {
    const choice = el("transport-choice").value;
    if (choice === "websocket" || choice === "sse") return choice;
    return typeof WebSocket === "function" ? "websocket" : "sse";
  }
  function connect() {
    transport?.close();
    const token = input("token").value.trim();
    transport = choose() === "websocket" ? new WsTransport(input("url").value.trim(), token) : new SseTransport(token);
    ui.transport(transport.name);
    for (const li of [...el("subscriptions").children]) {
      const channel = li.dataset.channel;
      if (channel) transport.subscribe(channel);
    }
  }
  function report(e) {
    return e instanceof Error ? e.message : String(e);
  }
  function start() {
    const params = new URLSearchParams(location.search);
    const ws = location.protocol === "https:" ? "wss:" : "ws:";
    input("url").value = params.get("url") ?? `${ws}//${location.host}/ws/connect`;
    input("token").value = params.get("token") ?? "";
    input("admin-key").value = params.get("admin_key") ?? "";
    const t = params.get("transport");
    if (t === "sse" || t === "websocket") el("transport-choice").value = t;
    el("connect").onclick = connect;
    el("disconnect").onclick = () => transport?.close();
    el("subscribe").onclick = () => {
      const channel = input("channel").value.trim();
      if (!channel) return;
      if (!transport) connect();
      transport.subscribe(channel);
    };
    el("publish").onclick = async () => {
      const result = el("publish-result");
      try {
        if (!transport) connect();
        const data = JSON.parse(input("pub-data").value || "null");
        const offset = await transport.publish(input("pub-channel").value.trim(), input("pub-event").value.trim() || "message", data);
        result.textContent = `published at offset ${offset}`;
      } catch (e) {
        result.textContent = `failed: ${report(e)}`;
      }
    };
    el("send").onclick = async () => {
      if (!transport) connect();
      const out = el("chat-text");
      out.textContent = "";
      const stop = el("stop");
      const send = el("send");
      send.disabled = true;
      ui.runStatus("running");
      try {
        const run = await transport.chat(input("agent").value.trim() || "default", input("message").value, (delta) => {
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
        el("stats").textContent = JSON.stringify(await transport.stats(), null, 2);
      } catch (e) {
        el("stats").textContent = `failed: ${report(e)}`;
      }
    };
    if (params.get("connect") !== "0") connect();
  }
  start();
})();
