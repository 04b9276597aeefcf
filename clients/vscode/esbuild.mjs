// Bundles the extension (dist/extension.js, CommonJS for the extension host), the webview script
// (dist/webview.js, browser IIFE) and, with --test, the node tests (out/test/*.js).
import * as esbuild from "esbuild";
import { readdirSync } from "node:fs";

const args = new Set(process.argv.slice(2));
const production = args.has("--production");
const common = { bundle: true, sourcemap: !production, minify: production, logLevel: "info", target: "es2022" };

const builds = [
  { ...common, entryPoints: ["src/main.ts"], outfile: "dist/extension.js", platform: "node", format: "cjs",
    external: ["vscode"] },
  { ...common, entryPoints: ["src/webview/main.ts"], outfile: "dist/webview.js", platform: "browser", format: "iife" },
];
if (args.has("--test")) {
  const tests = readdirSync("test").filter((f) => f.endsWith(".test.ts")).map((f) => `test/${f}`);
  builds.push({ ...common, entryPoints: tests, outdir: "out/test", platform: "node", format: "cjs", external: ["vscode"] });
}

if (args.has("--watch")) {
  for (const b of builds) await (await esbuild.context(b)).watch();
} else {
  await Promise.all(builds.map((b) => esbuild.build(b)));
}
