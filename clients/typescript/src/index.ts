/**
 * @switchboard/client: a client for the Switchboard gateway's WebSocket
 * protocol (v1), for browsers and Node.js (with an injected `WebSocket`, such
 * as the `ws` package's).
 *
 * It keeps one connection up (full-jitter exponential backoff, close codes
 * and the `disconnect.reconnect` flag honoured), subscribes channels and
 * recovers them after a reconnect from their last `{offset, epoch}`, keeps
 * its token fresh, watches the server's heartbeat, and streams agent runs.
 *
 * No runtime dependency: everything here is plain ECMAScript 2020 plus the
 * WebSocket API, `setTimeout` and `atob`.
 */

// === Public types ===

/** The connection's state. */
export type ConnectionState = "disconnected" | "connecting" | "connected";

/** A subscription's state. */
export type SubscriptionState = "unsubscribed" | "subscribing" | "subscribed";

/** A position in a channel: the offset of the last event seen, and the channel's epoch. */
export interface StreamPosition {
  offset: number;
  epoch: string;
}

/**
 * What the client needs of a WebSocket: the browser's `WebSocket` and the
 * `ws` package's both fit. Handlers take `any` so that both assign.
 */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: any) => void) | null;
  onclose: ((ev: any) => void) | null;
  onerror: ((ev: any) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

/** A WebSocket constructor, such as `globalThis.WebSocket` or `require("ws")`. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** One AG-UI event (camelCase, as the agent sent it). */
export interface AgUiEvent {
  type: string;
  [field: string]: unknown;
}

export interface ClientOptions {
  /** The WebSocket constructor; defaults to `globalThis.WebSocket` (browsers, Node 22+). */
  WebSocket?: WebSocketConstructor;
  /** A token (JWT) sent in an `authorize` frame on every connect. */
  token?: string;
  /**
   * Called for a token on connect when there is none or it is about to expire,
   * and before `exp` to `refresh` the connection's token. Throw an
   * `UnauthorizedError` to stop connecting; other errors are retried.
   */
  getToken?: () => string | Promise<string>;
  /** Shortest reconnect backoff cap, ms (default 500). */
  minReconnectDelay?: number;
  /** Longest reconnect backoff cap, ms (default 20000). */
  maxReconnectDelay?: number;
  /** Default timeout of `rpc`, `publish`, `chat` and `interrupt`, ms (default 10000). */
  timeout?: number;
  /** How long opening a connection (up to `connected`, and `authorized`) may take, ms (default 10000). */
  connectTimeout?: number;
  /**
   * How long before the token's `exp` to refresh it, ms (default 10000); a
   * token that lives less than twice this is refreshed halfway through.
   */
  refreshMargin?: number;
  /** Logs the client's decisions. */
  debug?: (message: string, ...args: unknown[]) => void;
}

/** What the server said in its `connected` frame (and `authorized`, when a token was sent). */
export interface ConnectedContext {
  connectionId: string;
  userId: string | null;
  node: string | null;
  /** Seconds. */
  heartbeat: { interval: number; timeout: number };
  limits: { max_message_bytes?: number; max_subscriptions?: number; [k: string]: unknown };
  /** The token's `exp` (Unix seconds), or null. */
  expiresAt: number | null;
  /** How many times this client connected before (0 on the first connect). */
  reconnects: number;
}

/** Why the client is (re)connecting or disconnected. */
export interface DisconnectContext {
  /** A close code of the server (SPEC §3.4) or the WebSocket, or one of `LocalCode`. */
  code: number;
  reason: string;
  /** Whether the client goes on reconnecting. */
  reconnect: boolean;
  /** Set when the cause is an error, such as an `UnauthorizedError`. */
  error?: Error;
}

/** An `event` frame. */
export interface ChannelEvent {
  channel: string;
  /** The event's name. */
  event: string;
  data: unknown;
  /** The event's UUID. */
  id: string;
  offset: number;
  epoch: string;
  /** Unix seconds, millisecond precision. */
  timestamp: number;
  /** Whether it is one of the missed events replayed by a recovering subscribe. */
  replayed: boolean;
}

export interface SubscribedContext {
  channel: string;
  position: StreamPosition;
  /** Whether the subscribe asked to recover (sent `since`). */
  recovering: boolean;
  /**
   * With `recovering`: true when every missed event follows (`missed` of
   * them), false when they could not be given (another epoch, or trimmed).
   * False means your state built from this channel is stale: reload it
   * (a `reload` event is emitted too). Undefined when not recovering.
   */
  recovered?: boolean;
  /** How many missed events follow. */
  missed: number;
  /** Whether this is a resubscribe after a reconnect. */
  resubscribed: boolean;
}

/** The "reload your state" signal: a recovery failed and events may have been missed. */
export interface ReloadContext {
  channel: string;
  /** Where the client was. */
  since: StreamPosition;
  /** The channel's current position: what follows is live from here. */
  position: StreamPosition;
}

export interface UnsubscribedContext {
  /** `client` (you unsubscribed), `server` or `permission` (the server ended it), or `error` (a subscribe was refused). */
  reason: "client" | "server" | "permission" | "error" | string;
  error?: SwitchboardError;
}

export interface StateChange<S> {
  state: S;
  previous: S;
}

export interface ClientEvents {
  state: StateChange<ConnectionState>;
  connecting: DisconnectContext;
  connected: ConnectedContext;
  disconnected: DisconnectContext;
  /** Errors that do not reject a call: transport, token, server `error` frames without an id. */
  error: { type: "transport" | "token" | "refresh" | "server" | "frame"; error: Error };
  /** Events of channels without a `Subscription`: the personal channel, a token's `channels`, `default_channels`, `broadcast`. */
  publication: ChannelEvent;
  /** A channel the server subscribed this connection to by itself (personal channel, token claim, default channels). */
  serverSubscribed: { channel: string; position: StreamPosition };
  /** The token was refreshed. */
  refreshed: { expiresAt: number | null };
  /** The server's JSON `ping` (answered with `pong`). */
  ping: { timestamp: number };
}

export interface SubscriptionEvents {
  state: StateChange<SubscriptionState>;
  subscribing: { reason: string; code?: number };
  subscribed: SubscribedContext;
  /** Recovery failed: reload your state (see `SubscribedContext.recovered`). */
  reload: ReloadContext;
  unsubscribed: UnsubscribedContext;
  event: ChannelEvent;
  error: { error: SwitchboardError };
}

export interface SubscriptionOptions {
  /** Recover from here on the first subscribe (a position you kept, say in `localStorage`). */
  since?: StreamPosition;
  /** Send `since` on resubscribes to recover what was missed (default true). */
  recover?: boolean;
}

export interface ChatOptions {
  agent?: string;
  /** Continue this thread; a new one when absent. */
  threadId?: string;
  state?: unknown;
  tools?: unknown[];
  context?: unknown[];
  /** What to do when the thread has an active run (default: `error thread_busy`). */
  multitask?: "interrupt" | "enqueue";
  /** `cancel` stops the run when this connection closes; default `continue` (the client resumes it after a reconnect). */
  onDisconnect?: "cancel" | "continue";
  /** Timeout for the `run` reply, ms (default `timeout`; none with `multitask: "enqueue"`). */
  timeout?: number;
}

export interface PublishResult {
  channel: string;
  offset: number;
  eventId: string;
}

export interface InterruptResult {
  runId: string | null;
  threadId: string | null;
  cancelled: boolean;
}

/** Codes of the client's own decisions (the server's close codes are 1000 and above). */
export const LocalCode = {
  /** `connect()` or `disconnect()` was called. */
  CALLED: 0,
  /** No frame arrived within `heartbeat.interval + heartbeat.timeout`. */
  HEARTBEAT_TIMEOUT: 1,
  /** The connection did not open (`connected`, `authorized`) within `connectTimeout`. */
  CONNECT_TIMEOUT: 2,
  /** `getToken()` failed (not with an `UnauthorizedError`): retried. */
  TOKEN_ERROR: 3,
  /** The WebSocket could not be created. */
  TRANSPORT_ERROR: 4,
} as const;

// === Errors ===

/** An error the server answered (`code` as in SPEC §3.4), or one of the client's. */
export class SwitchboardError extends Error {
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.name = "SwitchboardError";
    this.code = code;
  }
}

/** A token was refused (or `getToken` threw it): the client stops reconnecting. */
export class UnauthorizedError extends SwitchboardError {
  constructor(message = "unauthorized") {
    super("unauthorized", message);
    this.name = "UnauthorizedError";
  }
}

/** A call got no answer in time. */
export class TimeoutError extends SwitchboardError {
  constructor(message = "timed out") {
    super("timeout", message);
    this.name = "TimeoutError";
  }
}

/** The connection was lost while a call was in flight (it may or may not have been done), or the client was disconnected. */
export class DisconnectedError extends SwitchboardError {
  constructor(message = "disconnected") {
    super("disconnected", message);
    this.name = "DisconnectedError";
  }
}

/** An `rpc_response` with an `error`. */
export class RpcError extends SwitchboardError {
  constructor(code: string, message: string) {
    super(code, message);
    this.name = "RpcError";
  }
}

function isUnauthorized(e: unknown): boolean {
  return e instanceof UnauthorizedError || (e as { name?: string })?.name === "UnauthorizedError";
}

function asError(e: unknown): Error {
  return e instanceof Error ? e : new Error(String(e));
}

// === Events ===

type Handler<T> = (arg: T) => void;

/** A minimal typed event emitter (no dependency on Node's `events`). */
export class Emitter<E> {
  private handlers = new Map<keyof E, Set<Handler<any>>>();

  /** Adds a handler; returns a function that removes it. */
  on<K extends keyof E>(event: K, handler: Handler<E[K]>): () => void {
    let set = this.handlers.get(event);
    if (!set) this.handlers.set(event, (set = new Set()));
    set.add(handler);
    return () => this.off(event, handler);
  }

  once<K extends keyof E>(event: K, handler: Handler<E[K]>): () => void {
    const off = this.on(event, (arg) => {
      off();
      handler(arg);
    });
    return off;
  }

  off<K extends keyof E>(event: K, handler: Handler<E[K]>): void {
    this.handlers.get(event)?.delete(handler);
  }

  removeAllListeners(event?: keyof E): void {
    if (event === undefined) this.handlers.clear();
    else this.handlers.delete(event);
  }

  protected emit<K extends keyof E>(event: K, arg: E[K]): void {
    const set = this.handlers.get(event);
    if (!set) return;
    for (const handler of [...set]) {
      try {
        handler(arg);
      } catch (e) {
        // A handler's bug must not break the connection's state machine;
        // report it where uncaught errors go.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
}

// === Frames ===

type Frame = { type: string; id?: string | number; [field: string]: any };

interface Pending {
  frame: Frame;
  /** Returns true when the frame settled the call. */
  onReply: (frame: Frame) => void;
  onFail: (error: Error) => void;
  timer?: ReturnType<typeof setTimeout>;
  /** Sent on the transport of this generation; null while queued. */
  sentOn: number | null;
}

const OPEN = 1;

/** `exp` of a JWT (Unix seconds), read without verifying it; null when absent or unreadable. */
export function tokenExpiry(token: string): number | null {
  try {
    const part = token.split(".")[1];
    if (!part) return null;
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const padded = b64 + "=".repeat((4 - (b64.length % 4)) % 4);
    const json = JSON.parse(atob(padded));
    return typeof json.exp === "number" ? json.exp : null;
  } catch {
    return null;
  }
}

/** Full-jitter exponential backoff: a random delay in [0, min(max, min * 2^attempt)). */
export function backoff(attempt: number, min: number, max: number): number {
  const cap = Math.min(max, min * Math.pow(2, Math.min(attempt, 31)));
  return Math.floor(Math.random() * cap);
}

/** Whether a close code, without a `disconnect` frame, calls for a reconnect: anything but 4500-4999. */
export function reconnectsAfter(code: number): boolean {
  return !(code >= 4500 && code <= 4999);
}

// === Client ===

/**
 * One connection to a Switchboard gateway.
 *
 * ```ts
 * const client = new Client("ws://127.0.0.1:8000/ws/connect", { getToken });
 * const sub = client.newSubscription("missions");
 * sub.on("event", (e) => console.log(e.event, e.data));
 * sub.on("reload", () => refetchEverything());
 * sub.subscribe();
 * client.connect();
 * ```
 */
export class Client extends Emitter<ClientEvents> {
  readonly url: string;
  private readonly opts: Required<Pick<ClientOptions, "minReconnectDelay" | "maxReconnectDelay" | "timeout" | "connectTimeout" | "refreshMargin">> &
    ClientOptions;
  private readonly Ctor: WebSocketConstructor;

  private _state: ConnectionState = "disconnected";
  private ws: WebSocketLike | null = null;
  /** Increases with every transport, so that late callbacks of an old one are ignored. */
  private generation = 0;
  private attempts = 0;
  private connects = 0;
  private nextId = 1;
  private pending = new Map<string | number, Pending>();
  /** Calls waiting for the connection. */
  private queued: Pending[] = [];
  private subs = new Map<string, Subscription>();
  private runs = new Map<string, Run>();
  private token: string | null;
  /** Whether the token of the current connect came from `getToken()` just now. */
  private tokenFetched = false;
  private tokenExp: number | null;
  /** The server's `disconnect` frame on the current transport. */
  private farewell: { code: number; reason: string; reconnect: boolean } | null = null;
  private reconnectTimer?: ReturnType<typeof setTimeout>;
  private connectTimer?: ReturnType<typeof setTimeout>;
  private watchdog?: ReturnType<typeof setTimeout>;
  private refreshTimer?: ReturnType<typeof setTimeout>;
  private lastFrameAt = 0;
  private windowMs = 0;
  private info: ConnectedContext | null = null;
  /** Requests whose reply was a `run`: a later `error` with the same id belongs to that run. */
  private runByRequest = new Map<string | number, Run>();

  constructor(url: string, options: ClientOptions = {}) {
    super();
    this.url = url;
    const given = Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) as ClientOptions;
    this.opts = {
      minReconnectDelay: 500,
      maxReconnectDelay: 20000,
      timeout: 10000,
      connectTimeout: 10000,
      refreshMargin: 10000,
      ...given,
    };
    const Ctor = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!Ctor) {
      throw new TypeError("no WebSocket: pass `WebSocket` in the options (in Node 20, `import WebSocket from \"ws\"`)");
    }
    this.Ctor = Ctor;
    this.token = options.token ?? null;
    this.tokenExp = this.token ? tokenExpiry(this.token) : null;
  }

  get state(): ConnectionState {
    return this._state;
  }

  /** What the server said when this connection opened; null when not connected. */
  get connection(): ConnectedContext | null {
    return this._state === "connected" ? this.info : null;
  }

  /** Connects, and keeps reconnecting until `disconnect()` or a close that says not to. */
  connect(): void {
    if (this._state !== "disconnected") return;
    this.attempts = 0;
    this.setState("connecting");
    this.emit("connecting", { code: LocalCode.CALLED, reason: "connect called", reconnect: true });
    void this.open();
  }

  /** Closes the connection and stops reconnecting; subscriptions resubscribe on the next `connect()`. */
  disconnect(): void {
    this.stop({ code: LocalCode.CALLED, reason: "disconnect called", reconnect: false });
  }

  /**
   * Resolves once connected; rejects if the client ends up disconnected
   * (with the reason, such as an `UnauthorizedError`) or after `timeout` ms.
   */
  ready(timeout?: number): Promise<void> {
    if (this._state === "connected") return Promise.resolve();
    if (this._state === "disconnected") return Promise.reject(new DisconnectedError("the client is disconnected; call connect()"));
    return new Promise((resolve, reject) => {
      let timer: ReturnType<typeof setTimeout> | undefined;
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
      if (timeout !== undefined) {
        timer = setTimeout(() => {
          done();
          reject(new TimeoutError(`not connected within ${timeout} ms`));
        }, timeout);
      }
    });
  }

  // --- Subscriptions ---

  /** Creates a subscription (not yet subscribed: call `subscribe()`). One per channel. */
  newSubscription(channel: string, options: SubscriptionOptions = {}): Subscription {
    if (this.subs.has(channel)) throw new Error(`a subscription to ${JSON.stringify(channel)} exists; use getSubscription`);
    const sub = new Subscription(this, channel, options);
    this.subs.set(channel, sub);
    return sub;
  }

  getSubscription(channel: string): Subscription | undefined {
    return this.subs.get(channel);
  }

  subscriptions(): Subscription[] {
    return [...this.subs.values()];
  }

  /** Unsubscribes and forgets a subscription. */
  removeSubscription(sub: Subscription): void {
    sub.unsubscribe();
    if (this.subs.get(sub.channel) === sub) this.subs.delete(sub.channel);
  }

  // --- Calls ---

  /** Publishes to a channel whose namespace allows client publishing. */
  async publish(channel: string, event: string, data: unknown, options: { timeout?: number } = {}): Promise<PublishResult> {
    const reply = await this.call({ type: "publish", channel, event, data }, ["published"], options.timeout ?? this.opts.timeout);
    return { channel: reply.channel, offset: reply.offset, eventId: reply.event_id };
  }

  /** Calls a method on the agent bridge; rejects with an `RpcError` when the answer is an error. */
  async rpc<T = unknown>(method: string, params: unknown = {}, options: { timeout?: number } = {}): Promise<T> {
    const reply = await this.call({ type: "rpc", method, params }, ["rpc_response"], options.timeout ?? this.opts.timeout);
    if (reply.error) throw new RpcError(String(reply.error.code), String(reply.error.message ?? reply.error.code));
    return reply.result as T;
  }

  /**
   * Starts a run with a new user message; resolves with the run once the
   * server accepted it. Iterate the run (`for await (const e of run)`) for
   * its AG-UI events; after a reconnect it resumes from the thread channel.
   */
  async chat(content: string, options: ChatOptions = {}): Promise<Run> {
    const frame: Frame = { type: "chat_message", content };
    if (options.agent !== undefined) frame.agent = options.agent;
    if (options.threadId !== undefined) frame.thread_id = options.threadId;
    if (options.state !== undefined) frame.state = options.state;
    if (options.tools !== undefined) frame.tools = options.tools;
    if (options.context !== undefined) frame.context = options.context;
    if (options.multitask !== undefined) frame.multitask = options.multitask;
    if (options.onDisconnect !== undefined) frame.on_disconnect = options.onDisconnect;
    const timeout = options.timeout ?? (options.multitask === "enqueue" ? 0 : this.opts.timeout);
    return this.startRun(frame, timeout);
  }

  /** Starts a run with a full AG-UI `RunAgentInput`. */
  async runAgent(
    agent: string,
    input: Record<string, unknown>,
    options: Pick<ChatOptions, "multitask" | "onDisconnect" | "timeout"> = {},
  ): Promise<Run> {
    const frame: Frame = { type: "run_agent", agent, input };
    if (options.multitask !== undefined) frame.multitask = options.multitask;
    if (options.onDisconnect !== undefined) frame.on_disconnect = options.onDisconnect;
    const timeout = options.timeout ?? (options.multitask === "enqueue" ? 0 : this.opts.timeout);
    return this.startRun(frame, timeout);
  }

  /** Stops a run (by run id), or every run of a thread (`{ threadId }`). */
  async interrupt(target: string | { runId?: string; threadId?: string }, options: { timeout?: number } = {}): Promise<InterruptResult> {
    const t = typeof target === "string" ? { runId: target } : target;
    const frame: Frame = { type: "interrupt_stream" };
    if (t.runId) frame.run_id = t.runId;
    if (t.threadId) frame.thread_id = t.threadId;
    const reply = await this.call(frame, ["interrupted"], options.timeout ?? this.opts.timeout);
    return { runId: reply.run_id ?? null, threadId: reply.thread_id ?? null, cancelled: !!reply.cancelled };
  }

  /** Runs this client follows (started here, not yet ended). */
  activeRuns(): Run[] {
    return [...this.runs.values()];
  }

  private async startRun(frame: Frame, timeout: number): Promise<Run> {
    let run: Run | undefined;
    await this.call(frame, ["run"], timeout, (reply) => {
      // Registered before any later frame is read: its agent_events follow at once.
      run = new Run(this, reply);
      this.runs.set(run.runId, run);
      if (reply.id !== undefined) this.runByRequest.set(reply.id, run);
    });
    return run!;
  }

  /**
   * Sends a frame with an id and resolves with the reply of one of `types`;
   * an `error` reply rejects with a `SwitchboardError`. Waits for the
   * connection when there is none (within the timeout); a timeout of 0 is none.
   */
  private call(frame: Frame, types: string[], timeout: number, onAccept?: (reply: Frame) => void): Promise<Frame> {
    return new Promise((resolve, reject) => {
      if (this._state === "disconnected") {
        reject(new DisconnectedError("the client is disconnected; call connect()"));
        return;
      }
      const id = this.nextId++;
      const p: Pending = {
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
        },
      };
      if (timeout > 0) {
        p.timer = setTimeout(() => p.onFail(new TimeoutError(`${frame.type} got no answer within ${timeout} ms`)), timeout);
      }
      this.pending.set(id, p);
      if (this._state === "connected") this.sendPending(p);
      else this.queued.push(p);
    });
  }

  private settle(id: string | number, p: Pending): void {
    if (p.timer) clearTimeout(p.timer);
    this.pending.delete(id);
    const i = this.queued.indexOf(p);
    if (i >= 0) this.queued.splice(i, 1);
  }

  private sendPending(p: Pending): void {
    p.sentOn = this.generation;
    if (!this.send(p.frame)) p.onFail(new DisconnectedError("the connection closed before the frame was sent"));
  }

  /** @internal Sends a frame on the current transport; returns false when it could not. */
  send(frame: Frame): boolean {
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
  request(frame: Frame, onReply: (reply: Frame) => void): boolean {
    const id = this.nextId++;
    const p: Pending = {
      frame: { ...frame, id },
      sentOn: this.generation,
      onReply: (reply) => {
        this.pending.delete(id);
        onReply(reply);
      },
      // Internal requests (subscribe, unsubscribe) are redone after a reconnect by their owner.
      onFail: () => this.pending.delete(id),
    };
    this.pending.set(id, p);
    if (!this.send(p.frame)) {
      this.pending.delete(id);
      return false;
    }
    return true;
  }

  // --- Connection ---

  private log(message: string, ...args: unknown[]): void {
    this.opts.debug?.(message, ...args);
  }

  private setState(state: ConnectionState): void {
    if (state === this._state) return;
    const previous = this._state;
    this._state = state;
    this.log(`state ${previous} -> ${state}`);
    this.emit("state", { state, previous });
  }

  /** The token for a new connection: the current one unless it is about to expire. */
  private async tokenForConnect(): Promise<string | null> {
    this.tokenFetched = false;
    if (!this.opts.getToken) return this.token;
    const fresh = this.tokenExp === null || this.tokenExp * 1000 - Date.now() > this.opts.refreshMargin;
    if (this.token && fresh) return this.token;
    const token = await this.opts.getToken();
    this.setToken(token);
    this.tokenFetched = true;
    return token;
  }

  private setToken(token: string): void {
    if (typeof token !== "string" || !token) throw new SwitchboardError("token", "getToken() returned no token");
    this.token = token;
    this.tokenExp = tokenExpiry(token);
  }

  private async open(): Promise<void> {
    const generation = ++this.generation;
    this.farewell = null;
    let token: string | null;
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
    let ws: WebSocketLike;
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
    ws.onmessage = (ev: { data: unknown }) => {
      if (generation !== this.generation) return;
      this.onData(ev.data, token);
    };
    ws.onclose = (ev: { code?: number; reason?: string }) => {
      if (generation !== this.generation) return;
      const code = typeof ev?.code === "number" ? ev.code : 1006;
      const reason = ev?.reason || (code === 1006 ? "connection lost" : "closed");
      const bye = this.farewell;
      const ctx: DisconnectContext = bye
        ? { code: bye.code, reason: bye.reason, reconnect: bye.reconnect }
        : { code, reason, reconnect: reconnectsAfter(code) };
      if (ctx.code === 4500) ctx.error = new UnauthorizedError(ctx.reason);
      this.lost(ctx);
    };
    ws.onerror = (ev: unknown) => {
      if (generation !== this.generation) return;
      // A close always follows; this only reports.
      const message = (ev as { message?: string })?.message ?? "WebSocket error";
      this.emit("error", { type: "transport", error: new Error(message) });
    };
  }

  private onData(data: unknown, token: string | null): void {
    this.lastFrameAt = Date.now();
    let text: string;
    if (typeof data === "string") text = data;
    else if (data instanceof ArrayBuffer) text = new TextDecoder().decode(data);
    else if (ArrayBuffer.isView(data)) text = new TextDecoder().decode(data as Uint8Array);
    else return;
    let frame: Frame;
    try {
      frame = JSON.parse(text);
    } catch (e) {
      this.emit("error", { type: "frame", error: new SwitchboardError("invalid_json", `a frame that is not JSON: ${asError(e).message}`) });
      return;
    }
    if (!frame || typeof frame !== "object" || typeof frame.type !== "string") return;
    this.onFrame(frame, token);
  }

  private onFrame(frame: Frame, token: string | null): void {
    if (frame.id !== undefined && frame.id !== null) {
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
      // An `event` frame's id is the event's; anything else is a late reply
      // to a call that timed out, which nothing waits for.
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
        // Without an id: a subscription of the server's (personal channel, token claim, defaults).
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

  private onConnectedFrame(frame: Frame, token: string | null): void {
    const hb = frame.heartbeat ?? {};
    this.info = {
      connectionId: frame.connection_id,
      userId: frame.user_id ?? null,
      node: frame.node ?? null,
      heartbeat: { interval: Number(hb.interval ?? 30), timeout: Number(hb.timeout ?? 10) },
      limits: frame.limits ?? {},
      expiresAt: null,
      reconnects: this.connects,
    };
    this.windowMs = (this.info.heartbeat.interval + this.info.heartbeat.timeout) * 1000;
    this.armWatchdog();
    if (!token) {
      this.established();
      return;
    }
    const generation = this.generation;
    const sent = this.request({ type: "authorize", token }, (reply) => {
      if (generation !== this.generation) return;
      if (reply.type === "authorized") {
        this.info!.userId = reply.user_id ?? this.info!.userId;
        this.info!.expiresAt = reply.expires_at ?? null;
        this.established();
      } else if (reply.code === "unauthorized" && this.opts.getToken && !this.tokenFetched) {
        // A kept token was refused: try once more with a fresh one.
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
  private established(): void {
    if (this.connectTimer) clearTimeout(this.connectTimer);
    this.connectTimer = undefined;
    this.attempts = 0;
    const info = this.info!;
    this.connects++;
    this.setState("connected");
    this.emit("connected", info);
    this.scheduleRefresh(info.expiresAt);
    for (const sub of this.subs.values()) sub.connected();
    for (const p of this.queued.splice(0)) this.sendPending(p);
    for (const run of this.runs.values()) run.connected();
  }

  private armWatchdog(): void {
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

  private scheduleRefresh(expiresAt: number | null): void {
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.refreshTimer = undefined;
    if (expiresAt === null || !this.opts.getToken) return;
    const remaining = expiresAt * 1000 - Date.now();
    const delay = Math.max(0, remaining - this.opts.refreshMargin, remaining / 2);
    const generation = this.generation;
    this.refreshTimer = setTimeout(() => void this.refresh(generation, expiresAt, 0), delay);
  }

  private async refresh(generation: number, expiresAt: number, failures: number): Promise<void> {
    if (generation !== this.generation || this._state !== "connected") return;
    let token: string;
    try {
      const t = await this.opts.getToken!();
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
      // Retry until the token expires; past that the server closes with 4005 and we reconnect.
      const delay = backoff(failures, this.opts.minReconnectDelay, this.opts.maxReconnectDelay);
      if (expiresAt * 1000 > Date.now()) {
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

  private clearTimers(): void {
    for (const t of [this.reconnectTimer, this.connectTimer, this.watchdog, this.refreshTimer]) if (t) clearTimeout(t);
    this.reconnectTimer = this.connectTimer = this.watchdog = this.refreshTimer = undefined;
  }

  /** Drops the current transport (without waiting for its close handshake). */
  private dropTransport(hard: boolean): void {
    const ws = this.ws;
    this.ws = null;
    this.generation++;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    // An error handler stays, so that a late error of a dropped socket is not unhandled.
    ws.onerror = () => {};
    try {
      if (ws.readyState <= OPEN) ws.close(1000, "client closing");
    } catch {
      /* already closed */
    }
    const terminate = (ws as { terminate?: () => void }).terminate;
    if (hard && typeof terminate === "function") {
      try {
        terminate.call(ws);
      } catch {
        /* ignore */
      }
    }
  }

  /** The transport is gone: fail what was in flight, then reconnect or stop as `ctx` says. */
  private lost(ctx: DisconnectContext): void {
    this.log(`lost: ${ctx.code} ${ctx.reason} (reconnect: ${ctx.reconnect})`);
    const generation = this.generation;
    // A lost or silent socket may never finish a closing handshake.
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

  private retry(ctx: DisconnectContext): void {
    this.setState("connecting");
    this.emit("connecting", ctx);
    const delay = backoff(this.attempts++, this.opts.minReconnectDelay, this.opts.maxReconnectDelay);
    this.log(`reconnecting in ${delay} ms`);
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      if (this._state === "connecting") void this.open();
    }, delay);
  }

  private stop(ctx: DisconnectContext): void {
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

  private onEvent(frame: Frame): void {
    const sub = this.subs.get(frame.channel);
    let delivered = false;
    if (sub) delivered = sub.event(frame);
    else {
      delivered = true;
      this.emit("publication", toEvent(frame, false));
    }
    // A thread channel carries runs' events: `{run_id, seq, event}`.
    if (delivered && frame.channel.startsWith("thread:")) {
      const data = frame.data as { run_id?: string; seq?: number; event?: AgUiEvent } | null;
      const run = data?.run_id ? this.runs.get(data.run_id) : undefined;
      if (run && typeof data!.seq === "number" && data!.event) run.push(data!.seq, data!.event);
    }
  }

  /** @internal A run ended: forget it. */
  runEnded(run: Run): void {
    if (this.runs.get(run.runId) === run) this.runs.delete(run.runId);
    for (const [id, r] of this.runByRequest) if (r === run) this.runByRequest.delete(id);
  }

  /** @internal */
  get backoffOptions(): { min: number; max: number } {
    return { min: this.opts.minReconnectDelay, max: this.opts.maxReconnectDelay };
  }

  /** @internal Creates the subscription a run resumes from, when none exists. */
  resumeSubscription(channel: string, since: StreamPosition): Subscription | null {
    if (this.subs.has(channel)) return null;
    const sub = this.newSubscription(channel, { since });
    sub.internal = true;
    return sub;
  }
}

function errorOf(frame: Frame): SwitchboardError {
  const code = String(frame.code ?? "internal");
  const message = String(frame.message ?? code);
  return code === "unauthorized" ? new UnauthorizedError(message) : new SwitchboardError(code, message);
}

function toEvent(frame: Frame, replayed: boolean): ChannelEvent {
  return {
    channel: frame.channel,
    event: frame.event,
    data: frame.data,
    id: frame.id as string,
    offset: frame.offset,
    epoch: frame.epoch,
    timestamp: frame.timestamp,
    replayed,
  };
}

/** Errors a subscribe is retried after (with backoff), rather than given up on. */
const TRANSIENT = new Set(["unavailable", "rate_limited", "internal"]);

// === Subscription ===

/** A channel subscription: its own state, position and events. Create it with `client.newSubscription`. */
export class Subscription extends Emitter<SubscriptionEvents> {
  readonly channel: string;
  private _state: SubscriptionState = "unsubscribed";
  private _position: StreamPosition | null;
  private readonly recover: boolean;
  /** The user wants it subscribed. */
  private wanted = false;
  /** Counts subscribe requests, so that replies to stale ones are ignored. */
  private attempt = 0;
  private everSubscribed = false;
  private replayLeft = 0;
  private retries = 0;
  private retryTimer?: ReturnType<typeof setTimeout>;
  /** @internal Created by a run to resume from; removed when the run ends. */
  internal = false;

  /** @internal Use `client.newSubscription`. */
  constructor(
    private readonly client: Client,
    channel: string,
    options: SubscriptionOptions,
  ) {
    super();
    this.channel = channel;
    this._position = options.since ? { ...options.since } : null;
    this.recover = options.recover ?? true;
  }

  get state(): SubscriptionState {
    return this._state;
  }

  /** The last position seen (the last event's, or the one `subscribed` gave); null before any. */
  get position(): StreamPosition | null {
    return this._position ? { ...this._position } : null;
  }

  subscribe(): void {
    if (this.wanted) return;
    this.wanted = true;
    this.setState("subscribing");
    this.emit("subscribing", { reason: "subscribe called" });
    if (this.client.state === "connected") this.send();
  }

  unsubscribe(): void {
    const was = this._state;
    this.wanted = false;
    this.attempt++;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    if (was === "unsubscribed") return;
    if (this.client.state === "connected") this.client.request({ type: "unsubscribe", channel: this.channel }, () => {});
    this.setState("unsubscribed");
    this.emit("unsubscribed", { reason: "client" });
  }

  /** Resolves once subscribed; rejects if the subscription ends unsubscribed, or after `timeout` ms. */
  ready(timeout?: number): Promise<void> {
    if (this._state === "subscribed") return Promise.resolve();
    if (this._state === "unsubscribed") return Promise.reject(new SwitchboardError("unsubscribed", "the subscription is not subscribing"));
    return new Promise((resolve, reject) => {
      let timer: ReturnType<typeof setTimeout> | undefined;
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
      if (timeout !== undefined) {
        timer = setTimeout(() => {
          done();
          reject(new TimeoutError(`not subscribed within ${timeout} ms`));
        }, timeout);
      }
    });
  }

  private setState(state: SubscriptionState): void {
    if (state === this._state) return;
    const previous = this._state;
    this._state = state;
    this.emit("state", { state, previous });
  }

  private send(): void {
    const attempt = ++this.attempt;
    const since = this.recover && this._position ? { ...this._position } : undefined;
    const frame: Frame = { type: "subscribe", channel: this.channel };
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

  private subscribed(reply: Frame, since: StreamPosition | undefined, resubscribed: boolean): void {
    const position: StreamPosition = reply.position;
    this.retries = 0;
    this.everSubscribed = true;
    this.replayLeft = Number(reply.missed ?? 0);
    this._position = { offset: position.offset, epoch: position.epoch };
    if (since && reply.recovered) {
      // What follows starts after `since`; the reported position is the top.
      this._position = { ...since };
    }
    this.setState("subscribed");
    const ctx: SubscribedContext = {
      channel: this.channel,
      position: { ...position },
      recovering: !!since,
      missed: this.replayLeft,
      resubscribed,
    };
    if (since) ctx.recovered = !!reply.recovered;
    this.emit("subscribed", ctx);
    if (since && !reply.recovered) this.emit("reload", { channel: this.channel, since, position: { ...position } });
  }

  private refused(error: SwitchboardError): void {
    if (error.code === "already_subscribed") {
      // The server subscribed this connection by itself (a token's `channels`,
      // `default_channels`): its events reach us anyway.
      this.setState("subscribed");
      this.emit("subscribed", {
        channel: this.channel,
        position: this.position ?? { offset: 0, epoch: "" },
        recovering: false,
        missed: 0,
        resubscribed: this.everSubscribed,
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
  event(frame: Frame): boolean {
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
  connected(): void {
    if (this.wanted) this.send();
  }

  /** @internal */
  disconnected(ctx: DisconnectContext): void {
    this.attempt++;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    if (!this.wanted || this._state !== "subscribed") return;
    this.setState("subscribing");
    this.emit("subscribing", { reason: ctx.reason, code: ctx.code });
  }

  /** @internal A `subscribed` frame without an id. */
  serverSubscribed(frame: Frame): void {
    if (!this.wanted || this._state === "subscribed") return;
    this._position = frame.position;
    this.setState("subscribed");
    this.emit("subscribed", { channel: this.channel, position: frame.position, recovering: false, missed: 0, resubscribed: this.everSubscribed });
  }

  /** @internal The server ended the subscription. */
  serverUnsubscribed(reason: string): void {
    if (this._state === "unsubscribed") return;
    this.wanted = false;
    this.attempt++;
    this.setState("unsubscribed");
    this.emit("unsubscribed", { reason });
  }
}

// === Runs ===

/**
 * An agent run: its ids, and its AG-UI events as an async iterator (every
 * iterator starts from the first event). The run follows its `agent_event`
 * frames and, after a reconnect, its thread channel from `position`.
 */
export class Run implements AsyncIterable<AgUiEvent> {
  readonly runId: string;
  readonly threadId: string;
  /** The thread channel, `thread:<id>#<user>`. */
  readonly channel: string;
  /** The thread channel's position before the run's first event. */
  readonly position: StreamPosition;
  /** Every event so far, in `seq` order. */
  readonly events: AgUiEvent[] = [];
  /** Resolves with the last event (`RUN_FINISHED` or `RUN_ERROR`); rejects when the run cannot be followed. */
  readonly done: Promise<AgUiEvent>;
  private lastSeq = 0;
  private ended = false;
  private error: Error | null = null;
  private wake: Array<() => void> = [];
  private resolveDone!: (e: AgUiEvent) => void;
  private rejectDone!: (e: Error) => void;
  private resumeSub: Subscription | null = null;

  /** @internal Created by `client.chat`. */
  constructor(
    private readonly client: Client,
    frame: Frame,
  ) {
    this.runId = frame.run_id;
    this.threadId = frame.thread_id;
    this.channel = frame.channel;
    this.position = frame.position;
    this.done = new Promise((resolve, reject) => {
      this.resolveDone = resolve;
      this.rejectDone = reject;
    });
    // `done` may never be awaited: its rejection is reported through the iterator.
    this.done.catch(() => {});
  }

  /** `running`, `finished` (`RUN_FINISHED`), `error` (`RUN_ERROR`), or `failed` (could not be followed). */
  get status(): "running" | "finished" | "error" | "failed" {
    if (this.error) return "failed";
    if (!this.ended) return "running";
    return this.events[this.events.length - 1]?.type === "RUN_FINISHED" ? "finished" : "error";
  }

  /** The text of the run's text messages so far. */
  get text(): string {
    return this.events
      .filter((e) => e.type === "TEXT_MESSAGE_CONTENT")
      .map((e) => String(e.delta ?? ""))
      .join("");
  }

  /** Stops the run. */
  interrupt(): Promise<InterruptResult> {
    return this.client.interrupt(this.runId);
  }

  [Symbol.asyncIterator](): AsyncIterator<AgUiEvent> {
    let i = 0;
    return {
      next: async (): Promise<IteratorResult<AgUiEvent>> => {
        for (;;) {
          if (i < this.events.length) return { value: this.events[i++], done: false };
          if (this.error) throw this.error;
          if (this.ended) return { value: undefined, done: true };
          await new Promise<void>((resolve) => this.wake.push(resolve));
        }
      },
      return: async (): Promise<IteratorResult<AgUiEvent>> => {
        i = Infinity;
        return { value: undefined, done: true };
      },
    };
  }

  private notify(): void {
    for (const w of this.wake.splice(0)) w();
  }

  /** @internal An event of the run, from its `agent_event` or its thread channel. */
  push(seq: number, event: AgUiEvent): void {
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
  fail(error: Error): void {
    if (this.ended || this.error) return;
    this.error = error;
    this.cleanup();
    this.rejectDone(error);
    this.notify();
  }

  /** @internal The client (re)connected: after a reconnect, follow the thread channel. */
  connected(): void {
    // Called only for connections after the one the run started on, whose
    // `agent_event` frames are gone: its thread channel has them all.
    if (this.ended || this.error || this.resumeSub) return;
    const sub = this.client.resumeSubscription(this.channel, this.position);
    if (!sub) return; // The app's own subscription to the thread channel feeds the run.
    this.resumeSub = sub;
    sub.on("reload", () =>
      this.fail(new SwitchboardError("unrecoverable_position", `the run's events on ${this.channel} can no longer be recovered`)),
    );
    sub.on("unsubscribed", (ctx) => {
      if (ctx.error) this.fail(ctx.error);
    });
    sub.subscribe();
  }

  private cleanup(): void {
    this.client.runEnded(this);
    const sub = this.resumeSub;
    this.resumeSub = null;
    if (sub) this.client.removeSubscription(sub);
  }
}
