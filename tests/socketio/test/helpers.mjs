// Test helpers of the Socket.IO tests: the real binary and tokens come from
// tests/harness (shared with the TypeScript client's tests); here, Socket.IO
// clients that every test closes, and an agent worker over gRPC that
// registers commands.
import { io } from "socket.io-client";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { ADMIN_KEY, withTimeout } from "../../harness/switchboard.mjs";

export * from "../../harness/switchboard.mjs";

const here = dirname(fileURLToPath(import.meta.url));

/** Sockets made by `connect`, closed by `closeAll` (so that no test leaves one reconnecting). */
const sockets = new Set();
export function connect(server, nsp = "/ws", options = {}) {
  const socket = io(`ws://127.0.0.1:${server.port}${nsp}`, { forceNew: true, reconnectionDelay: 100, reconnectionDelayMax: 500, ...options });
  sockets.add(socket);
  return socket;
}
export function closeAll() {
  for (const s of sockets) s.disconnect();
  sockets.clear();
}

/** Resolves with the argument of the next `event` of `socket` for which `pred` holds; rejects after `ms`. */
export function next(socket, event, pred = () => true, ms = 10000) {
  let listener;
  const p = new Promise((resolve) => {
    listener = (arg) => {
      if (pred(arg)) resolve(arg);
    };
    socket.on(event, listener);
  });
  return withTimeout(p, ms, `socket.io event ${event}`).finally(() => socket.off(event, listener));
}

/** Collects the `event` frames of `channel` that `socket` receives. */
export function collect(socket, channel) {
  const got = [];
  socket.on("event", (e) => {
    if (e.channel === channel) got.push(e);
  });
  return got;
}

/**
 * An agent worker attached to the bridge over gRPC (`AgentWorker.Attach`)
 * that registers `methods` ({name: (params, call) => result}); resolves once
 * the bridge welcomed it. `close()` ends its stream.
 */
export async function attachWorker(server, methods) {
  const def = protoLoader.loadSync("switchboard/agent/v1/agent.proto", {
    includeDirs: [resolve(here, "../../../proto")],
    keepCase: true,
    longs: String,
    defaults: true,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(def).switchboard.agent.v1;
  const client = new pkg.AgentWorker(server.bridge, grpc.credentials.createInsecure());
  const meta = new grpc.Metadata();
  meta.set("authorization", `Bearer ${ADMIN_KEY}`);
  const stream = client.Attach(meta);
  stream.on("error", () => {});
  const welcomed = new Promise((resolve, reject) => {
    stream.on("data", (msg) => {
      if (msg.welcome) resolve();
      if (msg.call) {
        const { call_id, method, params } = msg.call;
        let reply;
        try {
          const result = methods[method](JSON.parse(Buffer.from(params).toString() || "null"), msg.call);
          reply = { call_result: { call_id, result: Buffer.from(JSON.stringify(result)) } };
        } catch (e) {
          reply = { call_result: { call_id, error: { code: "worker_error", message: String(e) } } };
        }
        stream.write(reply);
      }
    });
    stream.on("end", () => reject(new Error("the bridge ended the worker stream")));
  });
  stream.write({ hello: { worker_name: "sio-test-worker", agents: [], methods: Object.keys(methods), max_concurrent_runs: 1 } });
  await withTimeout(welcomed, 10000, "the bridge to welcome the worker");
  return {
    close() {
      stream.end();
      client.close();
    },
  };
}
