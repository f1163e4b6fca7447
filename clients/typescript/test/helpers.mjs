// Test helpers of the TypeScript client: the real binary and tokens come
// from tests/harness (shared with the Socket.IO tests); here, a recording
// WebSocket and clients that every test disconnects.
import WebSocket from "ws";
import { Client } from "../dist/index.mjs";

export * from "../../../tests/harness/switchboard.mjs";

/**
 * A `ws` WebSocket that records what the client sends and the sockets it
 * made, and can be held shut (it then dials a port nobody listens on, so
 * the attempt fails like a server that is down).
 */
export function recordingWebSocket() {
  const record = { sent: [], received: [], sockets: [], shut: false, attempts: 0 };
  class Recording extends WebSocket {
    constructor(url, protocols) {
      record.attempts++;
      super(record.shut ? "ws://127.0.0.1:1/ws/connect" : url, protocols);
      record.sockets.push(this);
      this.on("message", (data) => {
        try {
          record.received.push(JSON.parse(data.toString()));
        } catch {}
      });
    }
    send(data, ...rest) {
      record.sent.push(JSON.parse(data));
      return super.send(data, ...rest);
    }
  }
  record.WebSocket = Recording;
  return record;
}

/** Clients made by `makeClient`, disconnected by `disconnectAll` (so that no test leaves one reconnecting). */
const clients = new Set();
export function makeClient(url, options) {
  const client = new Client(url, options);
  clients.add(client);
  return client;
}
export function disconnectAll() {
  for (const c of clients) c.disconnect();
  clients.clear();
}
