// Copies the page's npm libraries into the Python package (src/parley/web/vendor), named
// with their versions so browsers may cache them for good. The copies are committed:
// installing Parley never needs Node. CI rebuilds them and fails if they differ.
import { copyFileSync, mkdirSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const vendor = join(root, "src", "parley", "web", "vendor");
const version = (name) =>
  JSON.parse(readFileSync(join(root, "node_modules", name, "package.json"), "utf8")).version;

const files = [
  ["marked", "lib/marked.esm.js", `marked-${version("marked")}.esm.js`],
  ["dompurify", "dist/purify.es.mjs", `purify-${version("dompurify")}.es.mjs`],
];

rmSync(vendor, { recursive: true, force: true });
mkdirSync(vendor, { recursive: true });
for (const [name, source, target] of files) {
  copyFileSync(join(root, "node_modules", name, source), join(vendor, target));
  console.log(`${name}: ${source} -> src/parley/web/vendor/${target}`);
}
console.log(readdirSync(vendor).sort().join("\n"));
