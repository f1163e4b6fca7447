// Compiled by `npm run typecheck` (never run): the public types as an app
// uses them, with both WebSocket implementations.
import WS from "ws";
import { Client, UnauthorizedError, type AgUiEvent, type ChannelEvent, type ConnectionState, type StreamPosition } from "@switchboard/client";

export async function usage(): Promise<void> {
  const client = new Client("ws://127.0.0.1:8000/ws/connect", {
    WebSocket: WS,
    getToken: async () => {
      const r = await fetch("/api/token");
      if (r.status === 401) throw new UnauthorizedError();
      return r.text();
    },
  });
  // The browser's own WebSocket fits too.
  new Client("ws://127.0.0.1:8000/ws/connect", { WebSocket: globalThis.WebSocket });
  const state: ConnectionState = client.state;
  client.on("state", ({ state, previous }) => console.log(previous, "->", state));
  client.on("disconnected", ({ code, reason, error }) => console.log(code, reason, error?.message));
  const sub = client.newSubscription("missions", { since: { offset: 1, epoch: "e" } });
  sub.on("event", (e: ChannelEvent) => console.log(e.offset, e.event, e.data));
  sub.on("reload", ({ position }) => console.log("reload from", position.offset));
  sub.on("subscribed", ({ recovered, missed }) => console.log(recovered === false ? "reload" : missed));
  sub.subscribe();
  client.connect();
  await client.ready(5000);
  const pos: StreamPosition | null = sub.position;
  const published = await client.publish("chat:1", "said", { text: "hi" });
  const offset: number = published.offset;
  const status = await client.rpc<{ bridge: string }>("get_status");
  const bridge: string = status.bridge;
  const run = await client.chat("hello", { agent: "echo", onDisconnect: "continue" });
  for await (const e of run) {
    const event: AgUiEvent = e;
    if (event.type === "TEXT_MESSAGE_CONTENT") console.log(event.delta);
  }
  const { cancelled } = await client.interrupt(run.runId);
  console.log(state, pos, offset, bridge, cancelled, (await run.done).type);
  client.disconnect();
}
