// Builds the console into gateway/assets/ (console.html, console.js), which
// the gateway embeds with include_str!. The TypeScript client is bundled from
// its sources (../typescript/src), so nothing else needs building first.
// `--check` builds into a temporary directory and fails unless the result is
// byte for byte what is committed (esbuild's output is deterministic).
import { build } from "esbuild";
import { copyFileSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const assets = join(here, "../../gateway/assets");
const files = ["console.html", "console.js"];
const check = process.argv.includes("--check");
const out = check ? mkdtempSync(join(tmpdir(), "sb-console-")) : assets;

await build({
  absWorkingDir: here,
  entryPoints: ["src/console.ts"],
  outfile: join(out, "console.js"),
  bundle: true,
  format: "iife",
  platform: "browser",
  target: "es2020",
  charset: "utf8",
  legalComments: "none",
  logLevel: "warning",
});
copyFileSync(join(here, "src/console.html"), join(out, "console.html"));

if (check) {
  const stale = files.filter((f) => !readFileSync(join(out, f)).equals(readFileSync(join(assets, f))));
  rmSync(out, { recursive: true, force: true });
  if (stale.length) {
    console.error(`gateway/assets/ is not what clients/console builds (${stale.join(", ")}): run \`npm run build\` in clients/console and commit`);
    process.exit(1);
  }
  console.log(`gateway/assets/ matches a fresh build (${files.join(", ")})`);
}
