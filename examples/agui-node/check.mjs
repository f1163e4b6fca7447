#!/usr/bin/env node
// Checks that the stock AG-UI TypeScript client (`HttpAgent` from
// `@ag-ui/client`, unchanged) completes runs against Switchboard's AG-UI HTTP
// endpoint, `POST /agui/{agent}`.
//
//   node check.mjs --url http://127.0.0.1:8080 [--token JWT] [--agent echo] [--timeout 15]
//
// Environment: SWITCHBOARD_URL, SWITCHBOARD_TOKEN, SWITCHBOARD_AGENT.
// Prints one PASS/FAIL line per check, then `N passed, M failed`; exits 1 when M > 0.

import { HttpAgent, randomUUID } from "@ag-ui/client";

// ---------------------------------------------------------------- arguments

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const m = /^--([a-z-]+)(?:=(.*))?$/.exec(arg);
    if (!m) usage(`unexpected argument ${JSON.stringify(arg)}`);
    const [, name, inline] = m;
    if (name === "help") usage();
    const value = inline ?? argv[++i];
    if (value === undefined) usage(`--${name} needs a value`);
    out[name] = value;
  }
  return out;
}

function usage(problem) {
  if (problem) console.error(`check.mjs: ${problem}`);
  console.error(
    "usage: node check.mjs --url http://HOST:PORT [--token JWT] [--agent echo] [--timeout SECONDS]\n" +
      "       (or SWITCHBOARD_URL / SWITCHBOARD_TOKEN / SWITCHBOARD_AGENT in the environment)",
  );
  process.exit(2);
}

const args = parseArgs(process.argv.slice(2));
const base = (args.url ?? process.env.SWITCHBOARD_URL ?? "").replace(/\/+$/, "");
if (!/^https?:\/\/[^/]+/.test(base)) usage("a base URL is required: --url http://HOST:PORT");
const token = args.token ?? process.env.SWITCHBOARD_TOKEN ?? "";
const agentName = args.agent ?? process.env.SWITCHBOARD_AGENT ?? "echo";
const timeoutMs = Math.round(Number(args.timeout ?? 15) * 1000);
if (!(timeoutMs > 0)) usage("--timeout must be a positive number of seconds");

// Credentials go in the way a web app passes them: HttpAgent's `headers`.
const headers = token ? { Authorization: `Bearer ${token}` } : {};

// ---------------------------------------------------------------- helpers

let passed = 0;
let failed = 0;

function pass(name, detail) {
  passed++;
  console.log(`PASS  ${name}${detail ? ` — ${detail}` : ""}`);
}

function fail(name, detail) {
  failed++;
  console.log(`FAIL  ${name}${detail ? ` — ${detail}` : ""}`);
}

function makeAgent(agent, threadId) {
  return new HttpAgent({ url: `${base}/agui/${agent}`, threadId, headers });
}

function userMessage(content) {
  return { id: randomUUID(), role: "user", content };
}

/**
 * One `agent.runAgent()` call, bounded by the timeout. Records every event the
 * client's pipeline delivers (after its own parsing and verification), and
 * the tool calls it reports. Resolves to `{ result, events, toolCalls, error }`.
 */
async function run(agent, label) {
  const events = [];
  const toolCalls = [];
  const subscriber = {
    onEvent: ({ event }) => {
      events.push(event);
    },
    onNewToolCall: ({ toolCall }) => {
      toolCalls.push(toolCall);
    },
  };
  // The stock client console.error()s "Agent execution failed: <error>"
  // before rejecting; the check reports that error itself, on one line.
  const consoleError = console.error;
  console.error = (...a) => {
    if (a[0] !== "Agent execution failed:") consoleError(...a);
  };
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => {
      // Aborting makes the client resolve quietly, so the timeout rejects on
      // its own rather than waiting for runAgent.
      agent.abortRun();
      reject(new Error(`${label}: no answer within ${timeoutMs / 1000} s`));
    }, timeoutMs);
  });
  try {
    const result = await Promise.race([agent.runAgent({ runId: randomUUID() }, subscriber), timeout]);
    return { result, events, toolCalls, error: undefined };
  } catch (error) {
    return { result: undefined, events, toolCalls, error };
  } finally {
    clearTimeout(timer);
    console.error = consoleError;
  }
}

const types = (events) => events.map((e) => e.type);
const describe = (error) => {
  if (!(error instanceof Error)) return String(error);
  const cause = error.cause?.code ?? error.cause?.message;
  return cause ? `${error.message} (${cause})` : error.message;
};
const assistantTexts = (messages) =>
  messages.filter((m) => m.role === "assistant" && typeof m.content === "string").map((m) => m.content);

/** Why a completed run is not a clean one, or undefined when it is. */
function runProblem(r, threadId) {
  if (r.error) return `runAgent rejected: ${describe(r.error)}`;
  const t = types(r.events);
  if (t[0] !== "RUN_STARTED") return `first event is ${t[0] ?? "missing"}, not RUN_STARTED (events: ${t.join(", ")})`;
  if (t.at(-1) !== "RUN_FINISHED") return `last event is ${t.at(-1)}, not RUN_FINISHED (events: ${t.join(", ")})`;
  const err = r.events.find((e) => e.type === "RUN_ERROR");
  if (err) return `RUN_ERROR ${err.code ?? ""}: ${err.message}`;
  if (r.events[0].threadId !== threadId) return `RUN_STARTED.threadId is ${r.events[0].threadId}, expected ${threadId}`;
  return undefined;
}

// ---------------------------------------------------------------- checks

console.log(`@ag-ui/client HttpAgent against ${base}/agui/${agentName}${token ? " (with a bearer token)" : " (anonymous)"}`);

// (a) "hello world": completes, and the agent's messages gain an assistant
//     message "hello world" built by the client from the streamed deltas.
const threadId = `node-check-${randomUUID()}`;
const agent = makeAgent(agentName, threadId);
agent.addMessage(userMessage("hello world"));
{
  const name = "(a) run 'hello world' completes with an assistant reply 'hello world'";
  const r = await run(agent, "run (a)");
  const problem = runProblem(r, threadId);
  const deltas = r.events.filter((e) => e.type === "TEXT_MESSAGE_CONTENT").map((e) => e.delta);
  const texts = assistantTexts(agent.messages);
  const newTexts = assistantTexts(r.result?.newMessages ?? []);
  if (problem) fail(name, problem);
  else if (!texts.includes("hello world")) fail(name, `assistant messages: ${JSON.stringify(texts)}`);
  else if (!newTexts.includes("hello world")) fail(name, `result.newMessages lacks it: ${JSON.stringify(r.result?.newMessages)}`);
  else pass(name, `events ${types(r.events).join(" ")}; deltas ${JSON.stringify(deltas)}`);
}

// (b) "what time is it": the client sees a tool call named get_time, both as
//     an event and in the assistant message's toolCalls, and the tool result.
{
  const name = "(b) run 'what time is it' produces a get_time tool call";
  const tid = `node-check-${randomUUID()}`;
  const timeAgent = makeAgent(agentName, tid);
  timeAgent.addMessage(userMessage("what time is it"));
  const r = await run(timeAgent, "run (b)");
  const problem = runProblem(r, tid);
  const start = r.events.find((e) => e.type === "TOOL_CALL_START");
  const inMessages = timeAgent.messages.flatMap((m) => (m.role === "assistant" ? (m.toolCalls ?? []) : []));
  const call = inMessages.find((c) => c.function?.name === "get_time");
  const toolResult = call && timeAgent.messages.find((m) => m.role === "tool" && m.toolCallId === call.id);
  if (problem) fail(name, problem);
  else if (start?.toolCallName !== "get_time") fail(name, `TOOL_CALL_START: ${JSON.stringify(start)}`);
  else if (!r.toolCalls.some((c) => c.function?.name === "get_time")) fail(name, "onNewToolCall never reported get_time");
  else if (!call) fail(name, `no assistant message carries the call: ${JSON.stringify(timeAgent.messages)}`);
  else if (!toolResult) fail(name, `no tool message answers ${call.id}`);
  else if (!assistantTexts(timeAgent.messages).includes("what time is it")) fail(name, "the text reply is missing");
  else pass(name, `call ${call.id} args ${call.function.arguments} result ${toolResult.content}`);
}

// (c) a second run on the same thread, same HttpAgent (the client re-sends its
//     messages; the server dedupes by id and keeps the thread's history).
{
  const name = "(c) a second run on the same thread completes";
  agent.addMessage(userMessage("second turn"));
  const r = await run(agent, "run (c)");
  const problem = runProblem(r, threadId);
  const roles = agent.messages.map((m) => m.role);
  const texts = assistantTexts(agent.messages);
  if (problem) {
    const hint =
      !token && r.error?.status === 403
        ? " (anonymous HTTP callers get a fresh identity per request, so the thread belongs to the first request's; pass --token)"
        : "";
    fail(name, problem + hint);
  } else if (JSON.stringify(texts) !== JSON.stringify(["hello world", "second turn"])) {
    fail(name, `assistant messages: ${JSON.stringify(texts)}`);
  } else pass(name, `thread ${threadId} now holds ${roles.join(", ")}`);
}

// (c') the server kept the history: a fresh HttpAgent on the same thread sends
//      no messages at all; the echo agent, which answers the thread's last user
//      message, can only answer "second turn" from the server's stored history.
{
  const name = "(c') the server kept the thread's history (fresh client, no messages sent)";
  const fresh = makeAgent(agentName, threadId);
  const r = await run(fresh, "run (c')");
  const problem = runProblem(r, threadId);
  const texts = assistantTexts(fresh.messages);
  if (problem) fail(name, problem);
  else if (!texts.includes("second turn")) fail(name, `reply ${JSON.stringify(texts)}, expected "second turn"`);
  else pass(name, `reply ${JSON.stringify(texts[0])} came from the stored history`);
}

// (d) an unknown agent: runAgent must reject (HTTP 404), not hang or resolve.
{
  const name = "(d) a run against /agui/nobody rejects";
  const nobody = makeAgent("nobody", `node-check-${randomUUID()}`);
  nobody.addMessage(userMessage("hello world"));
  const r = await run(nobody, "run (d)");
  if (!r.error) fail(name, `runAgent resolved (events: ${types(r.events).join(", ") || "none"})`);
  else if (/no answer within/.test(describe(r.error))) fail(name, describe(r.error));
  else if (r.error.status !== 404) fail(name, `rejected, but with ${r.error.status ?? "no"} status: ${describe(r.error)}`);
  else pass(name, `rejected: ${describe(r.error)}`);
}

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed > 0 ? 1 : 0);
