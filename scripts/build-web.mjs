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

const swagger = version("swagger-ui-dist");
const hljs = version("@highlightjs/cdn-assets");
const files = [
  ["marked", "lib/marked.esm.js", `marked-${version("marked")}.esm.js`],
  ["dompurify", "dist/purify.es.mjs", `purify-${version("dompurify")}.es.mjs`],
  // highlight.js, for code blocks: its ES module build with the common languages, and a
  // light and a dark theme (index.html picks one by the system's colour scheme).
  ["@highlightjs/cdn-assets", "es/highlight.min.js", `highlight-${hljs}.min.js`],
  ["@highlightjs/cdn-assets", "LICENSE", `highlight-${hljs}.LICENSE.txt`],
  ["@highlightjs/cdn-assets", "styles/github.min.css", `highlight-github-${hljs}.css`],
  ["@highlightjs/cdn-assets", "styles/github-dark.min.css", `highlight-github-dark-${hljs}.css`],
  // Swagger UI, for the interactive API docs at /docs (src/parley/web/docs.html).
  ["swagger-ui-dist", "swagger-ui-bundle.js", `swagger-ui-bundle-${swagger}.js`],
  ["swagger-ui-dist", "swagger-ui-bundle.js.LICENSE.txt", `swagger-ui-bundle-${swagger}.js.LICENSE.txt`],
  ["swagger-ui-dist", "swagger-ui.css", `swagger-ui-${swagger}.css`],
];

rmSync(vendor, { recursive: true, force: true });
mkdirSync(vendor, { recursive: true });
for (const [name, source, target] of files) {
  copyFileSync(join(root, "node_modules", name, source), join(vendor, target));
  console.log(`${name}: ${source} -> src/parley/web/vendor/${target}`);
}
console.log(readdirSync(vendor).sort().join("\n"));
