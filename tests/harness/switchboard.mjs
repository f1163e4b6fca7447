// The real `switchboard` binary for the Node test suites (the TypeScript
// client's, Socket.IO's): `switchboard up` on free loopback ports with a
// temporary data directory, tokens minted with node:crypto, and waiting
// with a bound. Node built-ins only, so every suite can import it.
import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync, existsSync, readdirSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";

const here = dirname(fileURLToPath(import.meta.url));

/** The binary: $SWITCHBOARD_BIN, else the workspace's debug build (what `cargo build` makes). */
export const BIN = process.env.SWITCHBOARD_BIN
  ? resolve(process.env.SWITCHBOARD_BIN)
  : resolve(here, "../../target/debug/switchboard");

export const SECRET = "a-test-hs256-secret-for-the-node-tests-0123456789";
export const ADMIN_KEY = "a-test-admin-key-for-the-node-tests-0123456789";

/** Every process these tests started, so that only they are killed. */
const started = new Set();
process.on("exit", () => {
  for (const child of started) {
    try {
      child.kill("SIGKILL");
    } catch {}
  }
});

function b64url(buf) {
  return Buffer.from(buf).toString("base64url");
}

/** An HS256 JWT signed with SECRET. */
export function mint({ sub, ttl = 600, exp, ...claims }, secret = SECRET) {
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const e = exp ?? Math.floor(Date.now() / 1000) + ttl;
  const payload = b64url(JSON.stringify({ sub, exp: e, ...claims }));
  const sig = createHmac("sha256", secret).update(`${header}.${payload}`).digest("base64url");
  return `${header}.${payload}.${sig}`;
}

/** A name no other test uses. */
export function unique(prefix) {
  return `${prefix}${randomBytes(4).toString("hex")}`;
}

const BASE_CONFIG = `
[auth]
hs256_secret = "${SECRET}"
admin_key = "${ADMIN_KEY}"

[namespaces.chat]
subscribe = "anonymous"
publish = "authenticated"
`;

/**
 * A `switchboard up` process. `config` is extra TOML (appended after the
 * base, which sets the token secret, the admin key and a `chat` namespace
 * that authenticated clients may publish to). `start()` again after `stop()`
 * reuses the gateway's port and the data directory.
 */
export class Server {
  constructor({ config = "", args = [], env = {} } = {}) {
    this.dir = mkdtempSync(join(tmpdir(), "sb-node-"));
    this.dataDir = join(this.dir, "data");
    this.configFile = join(this.dir, "switchboard.toml");
    writeFileSync(this.configFile, BASE_CONFIG + "\n" + config);
    this.args = args;
    this.env = env;
    this.port = 0;
    this.child = null;
    this.log = [];
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/ws/connect`;
  }

  get http() {
    return `http://127.0.0.1:${this.port}`;
  }

  get pid() {
    return this.child?.pid;
  }

  /** Starts the binary and resolves once its gateway is ready (linked to the bus). */
  async start() {
    if (!existsSync(BIN)) throw new Error(`no switchboard binary at ${BIN}: build it (cargo build --bin switchboard) or set SWITCHBOARD_BIN`);
    const args = [
      "up",
      "--config",
      this.configFile,
      "--gateway-listen",
      `127.0.0.1:${this.port}`,
      "--eventbus-listen",
      "127.0.0.1:0",
      "--agent-bridge-listen",
      "127.0.0.1:0",
      "--data-dir",
      this.dataDir,
      ...this.args,
    ];
    // A port just freed by a killed server may take a moment to be bound again.
    for (let attempt = 0; ; attempt++) {
      try {
        await this.spawn(args);
        break;
      } catch (e) {
        if (this.port === 0 || attempt >= 20) throw e;
        await delay(100);
      }
    }
    await this.waitReady();
    return this;
  }

  spawn(args) {
    return new Promise((resolve, reject) => {
      const env = { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "warn", ...this.env };
      const child = spawn(BIN, args, { env, stdio: ["ignore", "pipe", "pipe"] });
      started.add(child);
      const lines = createInterface({ input: child.stdout });
      let done = false;
      const fail = (why) => {
        if (done) return;
        done = true;
        reject(new Error(`switchboard ${why}; stderr:\n${this.log.slice(-20).join("\n")}`));
      };
      child.stderr.on("data", (d) => {
        this.log.push(...d.toString().split("\n"));
        if (this.log.length > 500) this.log.splice(0, this.log.length - 500);
        if (process.env.SWITCHBOARD_TEST_LOG) process.stderr.write(d);
      });
      child.on("exit", (code, signal) => {
        started.delete(child);
        fail(`exited (${code ?? signal}) before printing its addresses`);
      });
      lines.on("line", (line) => {
        const m = /^gateway\s+ws:\/\/127\.0\.0\.1:(\d+)\//.exec(line);
        if (m) this.port = Number(m[1]);
        const b = /^bridge\s+grpc:\/\/(\S+)/.exec(line);
        if (b) this.bridge = b[1];
        if (/^mode /.test(line) && !done) {
          done = true;
          this.child = child;
          resolve();
        }
      });
    });
  }

  async waitReady(timeout = 15000) {
    const until = Date.now() + timeout;
    for (;;) {
      try {
        const r = await fetch(`${this.http}/ready`);
        if (r.ok) return;
      } catch {}
      if (Date.now() > until) throw new Error("switchboard did not become ready");
      await delay(50);
    }
  }

  /** Sends `signal` to this server's process (by its PID) and waits for it to exit. */
  async stop(signal = "SIGTERM") {
    const child = this.child;
    if (!child) return;
    this.child = null;
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once("exit", resolve));
    process.kill(child.pid, signal);
    await withTimeout(exited, 20000, `switchboard ${child.pid} to exit on ${signal}`);
  }

  /** SIGSTOP / SIGCONT: the process stays, and answers nothing meanwhile. Resolves once it is stopped. */
  async pause() {
    const pid = this.child.pid;
    process.kill(pid, "SIGSTOP");
    // The signal is delivered asynchronously: wait until every thread is stopped.
    await until(() => {
      try {
        return readdirSync(`/proc/${pid}/task`).every((tid) => /^\d+ \(.*\) T /.test(readFileSync(`/proc/${pid}/task/${tid}/stat`, "utf8")));
      } catch {
        return false;
      }
    }, 5000, `process ${pid} to stop`);
  }

  resume() {
    process.kill(this.child.pid, "SIGCONT");
  }

  /** Stops the process and removes its directory. */
  async close() {
    if (this.child) {
      try {
        process.kill(this.child.pid, "SIGCONT");
      } catch {}
      await this.stop("SIGKILL");
    }
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** An admin HTTP call. */
  async admin(method, path, body) {
    const r = await fetch(`${this.http}${path}`, {
      method,
      headers: { authorization: `Bearer ${ADMIN_KEY}`, "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await r.text();
    if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${text}`);
    return text ? JSON.parse(text) : null;
  }

  /** Publishes through the bus (`POST /api/ws/broadcast`); resolves with the offset. */
  async publish(channel, type, message) {
    return (await this.admin("POST", "/api/ws/broadcast", { channel, type, message })).offset;
  }
}

export function delay(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    }),
  ]);
}

/** Resolves with the next `event` of `emitter` for which `pred` holds; rejects after `ms`. */
export function waitFor(emitter, event, pred = () => true, ms = 10000) {
  let off;
  const p = new Promise((resolve) => {
    off = emitter.on(event, (arg) => {
      if (pred(arg)) {
        off();
        resolve(arg);
      }
    });
  });
  return withTimeout(p, ms, `${String(event)}`).finally(() => off());
}

/** Resolves once `pred()` holds (checked every 10 ms); rejects after `ms`. */
export async function until(pred, ms = 5000, what = "a condition") {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await delay(10);
  }
}
