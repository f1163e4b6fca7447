// The real `switchboard up` for the browser tests: free loopback ports, the
// durable embedded backend in a temporary directory, restarted on the same
// port and data directory; only the processes started here are stopped, by PID.
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";

const here = dirname(fileURLToPath(import.meta.url));

/** The binary: $SWITCHBOARD_BIN, else the workspace's debug build. */
export const BIN = process.env.SWITCHBOARD_BIN ? resolve(process.env.SWITCHBOARD_BIN) : resolve(here, "../../../target/debug/switchboard");
export const ADMIN_KEY = "a-test-admin-key-for-the-console-0123456789";

const started = new Set();
process.on("exit", () => {
  for (const child of started) {
    try {
      process.kill(child.pid, "SIGKILL");
    } catch {}
  }
});

export function delay(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

export class Server {
  constructor(config = "") {
    this.dir = mkdtempSync(join(tmpdir(), "sb-console-"));
    this.configFile = join(this.dir, "switchboard.toml");
    writeFileSync(this.configFile, `[auth]\nadmin_key = "${ADMIN_KEY}"\n\n[agents.echo]\ndelay_ms = 30\n${config}`);
    this.port = 0;
    this.child = null;
    this.log = [];
  }

  get http() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Starts the binary (on the port it had, after a stop) and resolves once it is ready. */
  async start() {
    if (!existsSync(BIN)) throw new Error(`no switchboard binary at ${BIN}: cargo build --bin switchboard, or set SWITCHBOARD_BIN`);
    const args = [
      "up",
      "--config", this.configFile,
      "--backend", "embedded",
      "--data-dir", join(this.dir, "data"),
      "--gateway-listen", `127.0.0.1:${this.port}`,
      "--eventbus-listen", "127.0.0.1:0",
      "--agent-bridge-listen", "127.0.0.1:0",
    ];
    for (let attempt = 0; ; attempt++) {
      try {
        await this.spawn(args);
        break;
      } catch (e) {
        // A port just freed may take a moment to be bound again.
        if (this.port === 0 || attempt >= 20) throw e;
        await delay(100);
      }
    }
    const until = Date.now() + 15000;
    for (;;) {
      try {
        if ((await fetch(`${this.http}/ready`)).ok) return this;
      } catch {}
      if (Date.now() > until) throw new Error("switchboard did not become ready");
      await delay(50);
    }
  }

  spawn(args) {
    return new Promise((resolve, reject) => {
      const child = spawn(BIN, args, { env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "warn" }, stdio: ["ignore", "pipe", "pipe"] });
      started.add(child);
      let done = false;
      child.stderr.on("data", (d) => this.log.push(d.toString()));
      child.on("exit", (code, signal) => {
        started.delete(child);
        if (!done) {
          done = true;
          reject(new Error(`switchboard exited (${code ?? signal}) before printing its addresses: ${this.log.join("").slice(-2000)}`));
        }
      });
      createInterface({ input: child.stdout }).on("line", (line) => {
        const bus = /^eventbus\s+grpc:\/\/(127\.0\.0\.1:\d+)/.exec(line);
        if (bus) this.grpc = `http://${bus[1]}`;
        const m = /^console\s+http:\/\/127\.0\.0\.1:(\d+)\//.exec(line);
        if (m && !done) {
          done = true;
          this.port = Number(m[1]);
          this.child = child;
          resolve();
        }
      });
    });
  }

  /** SIGTERM (graceful: connections get `disconnect` 1001) and waits for the exit. */
  async stop(signal = "SIGTERM") {
    const child = this.child;
    if (!child) return;
    this.child = null;
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once("exit", r));
    process.kill(child.pid, signal);
    await exited;
  }

  async close() {
    await this.stop("SIGKILL");
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** Publishes over gRPC, as a producer does: `switchboard publish` against the bus. */
  publishGrpc(channel, event, data) {
    return new Promise((resolve, reject) => {
      const child = spawn(BIN, ["publish", "--url", this.grpc, "--key", ADMIN_KEY, channel, event, JSON.stringify(data)], { stdio: ["ignore", "pipe", "pipe"] });
      started.add(child);
      let out = "";
      child.stdout.on("data", (d) => (out += d));
      child.stderr.on("data", (d) => (out += d));
      child.on("exit", (code) => {
        started.delete(child);
        code === 0 ? resolve(out) : reject(new Error(`switchboard publish exited ${code}: ${out}`));
      });
    });
  }

  /** Publishes through the HTTP API (which goes through the bus); resolves with the offset. */
  async publish(channel, type, message) {
    const r = await fetch(`${this.http}/api/ws/broadcast`, {
      method: "POST",
      headers: { authorization: `Bearer ${ADMIN_KEY}`, "content-type": "application/json" },
      body: JSON.stringify({ channel, type, message }),
    });
    if (!r.ok) throw new Error(`publish: ${r.status} ${await r.text()}`);
    return (await r.json()).offset;
  }
}
