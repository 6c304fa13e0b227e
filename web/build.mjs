// Builds the playground page into daemon/unitbox/playground/ (served by
// daemon/unitbox/api/playground.py): index.html, and assets/ with a content
// hash in every name (cached for a year) and a .gz beside each (aiohttp's
// FileResponse sends it to clients that accept gzip). Everything comes from
// node_modules: the page fetches nothing from anywhere but the daemon.
import { build } from "esbuild";
import { mkdirSync, readFileSync, rmSync, writeFileSync, readdirSync } from "node:fs";
import { dirname, join, basename } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

const here = dirname(fileURLToPath(import.meta.url));
const out = process.argv[2] ?? join(here, "..", "daemon", "unitbox", "playground");
const assets = join(out, "assets");

rmSync(out, { recursive: true, force: true });
mkdirSync(assets, { recursive: true });

const result = await build({
  entryPoints: [join(here, "src", "main.js"), join(here, "src", "style.css")],
  bundle: true,
  minify: true,
  sourcemap: false,
  format: "esm",
  target: ["es2022"],
  outdir: assets,
  entryNames: "[name]-[hash]",
  metafile: true,
  legalComments: "eof",
  logLevel: "warning",
});

const built = {};
for (const [path, meta] of Object.entries(result.metafile.outputs)) {
  if (meta.entryPoint) built[basename(meta.entryPoint)] = basename(path);
}
const page = readFileSync(join(here, "src", "index.html"), "utf8")
  .replace("%MAIN_JS%", `/playground/assets/${built["main.js"]}`)
  .replace("%STYLE_CSS%", `/playground/assets/${built["style.css"]}`);
writeFileSync(join(out, "index.html"), page);

for (const name of readdirSync(assets)) {
  writeFileSync(join(assets, name + ".gz"), gzipSync(readFileSync(join(assets, name)), { level: 9 }));
}
const sizes = readdirSync(assets).map((n) => `${n} ${readFileSync(join(assets, n)).length}`);
console.log(`playground: ${out}\n  ${sizes.join("\n  ")}`);
