// Builds console/src into console/dist: one minified script (app.js), one
// stylesheet (app.css, uPlot's included) and index.html copied as it is.
// No source maps, no banner, no timestamps: the same sources and lock file
// give the same bytes, so CI can compare dist/ with a fresh build.
import { build } from "esbuild";
import { copyFile, mkdir } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
// `--out DIR` builds elsewhere (scripts/console --check compares the two).
const flag = process.argv.indexOf("--out");
const out = flag > 0 ? process.argv[flag + 1] : join(here, "dist");

await mkdir(out, { recursive: true });
await build({
  absWorkingDir: here,
  entryPoints: { app: "src/main.tsx" },
  outdir: out,
  bundle: true,
  minify: true,
  format: "iife",
  platform: "browser",
  target: ["es2022", "chrome110", "firefox115", "safari16"],
  jsx: "automatic",
  jsxImportSource: "preact",
  sourcemap: false,
  // Licence comments of the bundled libraries at the end of each file.
  legalComments: "eof",
  charset: "utf8",
  logLevel: "warning",
});
await copyFile(join(here, "src", "index.html"), join(out, "index.html"));
