// The package as published: ESM and CJS entry points with the same API,
// declarations for each, and nothing required at run time.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { readFileSync, existsSync } from "node:fs";
import * as esm from "@switchboard/client";

const require = createRequire(import.meta.url);
const pkg = JSON.parse(readFileSync(new URL("../package.json", import.meta.url)));

test("the ESM and CJS builds export the same API, and the package has no runtime dependency", () => {
  const cjs = require("@switchboard/client");
  const names = ["Client", "Subscription", "Run", "Emitter", "SwitchboardError", "UnauthorizedError", "TimeoutError", "DisconnectedError", "RpcError", "LocalCode", "backoff", "reconnectsAfter", "tokenExpiry"];
  for (const name of names) {
    assert.ok(esm[name], `ESM exports ${name}`);
    assert.ok(cjs[name], `CJS exports ${name}`);
  }
  assert.deepEqual(Object.keys(esm).sort(), Object.keys(cjs).sort());
  assert.equal(pkg.dependencies, undefined);
  assert.equal(pkg.peerDependencies, undefined);
  for (const file of ["dist/index.mjs", "dist/index.cjs"]) {
    const code = readFileSync(new URL(`../${file}`, import.meta.url), "utf8");
    assert.doesNotMatch(code, /^\s*import\b|\brequire\(["']|\bimport\(["']/m, `${file} imports nothing`);
  }
  for (const file of ["dist/index.d.mts", "dist/index.d.cts"]) assert.ok(existsSync(new URL(`../${file}`, import.meta.url)), file);
});

test("without a WebSocket constructor (Node 20 has none built in) the client says what to pass", () => {
  const saved = globalThis.WebSocket;
  delete globalThis.WebSocket;
  try {
    assert.throws(() => new esm.Client("ws://127.0.0.1:1/ws/connect"), /pass `WebSocket`/);
  } finally {
    if (saved) globalThis.WebSocket = saved;
  }
});

test("tokenExpiry reads a JWT's exp without verifying it", () => {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  assert.equal(esm.tokenExpiry(`${part({ alg: "HS256" })}.${part({ sub: "a", exp: 1700000000 })}.sig`), 1700000000);
  assert.equal(esm.tokenExpiry("not a token"), null);
  assert.equal(esm.tokenExpiry(`${part({})}.${part({ sub: "a" })}.sig`), null);
});
