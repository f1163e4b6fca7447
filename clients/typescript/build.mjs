// Builds dist/: ESM and CJS bundles with esbuild, declarations with tsc
// (copied to .d.mts and .d.cts so that each entry point has its own).
import { build } from "esbuild";
import { execFileSync } from "node:child_process";
import { copyFileSync, rmSync, mkdirSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
rmSync("dist", { recursive: true, force: true });
mkdirSync("dist");
const common = { entryPoints: ["src/index.ts"], bundle: true, platform: "neutral", target: "es2020", sourcemap: true, logLevel: "warning" };
await build({ ...common, format: "esm", outfile: "dist/index.mjs" });
await build({ ...common, format: "cjs", outfile: "dist/index.cjs" });
execFileSync(process.execPath, [require.resolve("typescript/bin/tsc"), "-p", "tsconfig.json", "--emitDeclarationOnly", "--declaration", "--outDir", "dist/types"], { stdio: "inherit" });
copyFileSync("dist/types/index.d.ts", "dist/index.d.mts");
copyFileSync("dist/types/index.d.ts", "dist/index.d.cts");
rmSync("dist/types", { recursive: true, force: true });
