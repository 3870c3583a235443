#!/usr/bin/env node
// Copies the pinned browser libraries from node_modules (installed by `npm ci`) into
// web/static/vendor/ under stable names, and writes web/static/vendor/manifest.json.
//
//   node vendor.mjs          write web/static/vendor/ (removes files it does not own)
//   node vendor.mjs --check  exit 1 if web/static/vendor/ differs from what it would write
//
// Node built-ins only. Run through `make vendor` / `make vendor-check`, which run `npm ci` first.

import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, relative, sep } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const NODE_MODULES = join(HERE, "node_modules");
const OUT = join(HERE, "..", "static", "vendor");
const MANIFEST = "manifest.json";

// file (under web/static/vendor/) <- package + path inside the package.
const FILES = [
  { file: "marked.js", package: "marked", source: "lib/marked.esm.js" },
  { file: "purify.js", package: "dompurify", source: "dist/purify.es.mjs" },
  { file: "highlight.js", package: "@highlightjs/cdn-assets", source: "es/highlight.min.js" },
  { file: "highlight-light.css", package: "@highlightjs/cdn-assets", source: "styles/github.min.css" },
  { file: "highlight-dark.css", package: "@highlightjs/cdn-assets", source: "styles/github-dark.min.css" },
  { file: "licenses/marked.txt", package: "marked", source: "LICENSE" },
  // DOMPurify is "(MPL-2.0 OR Apache-2.0)"; LICENSE is the Apache-2.0 text, the option we take.
  { file: "licenses/dompurify.txt", package: "dompurify", source: "LICENSE" },
  { file: "licenses/highlight.js.txt", package: "@highlightjs/cdn-assets", source: "LICENSE" },
];

// What each ES module must export, checked by importing the written bytes from a data: URL
// (which also proves the module is self-contained: a data: module cannot import relative paths).
const MODULE_CHECKS = {
  "marked.js": (m) => typeof m.marked?.parse === "function" && typeof m.Marked === "function",
  "purify.js": (m) => typeof m.default === "function" && typeof m.default.version === "string",
  "highlight.js": (m) => typeof m.default?.highlight === "function" && m.default.getLanguage("python") !== undefined,
};

class VendorError extends Error {}

function fail(message) {
  throw new VendorError(message);
}

function readJson(path) {
  try {
    return JSON.parse(readFileSync(path, "utf8"));
  } catch (error) {
    return fail(`cannot read ${relative(process.cwd(), path)}: ${error.message}`);
  }
}

function sha256(bytes) {
  return createHash("sha256").update(bytes).digest("hex");
}

// Stable JSON: object keys sorted at every level, two-space indent, trailing newline.
function stableJson(value) {
  const sort = (v) => {
    if (Array.isArray(v)) return v.map(sort);
    if (v !== null && typeof v === "object") {
      return Object.fromEntries(Object.keys(v).sort().map((k) => [k, sort(v[k])]));
    }
    return v;
  };
  return `${JSON.stringify(sort(value), null, 2)}\n`;
}

// Pinned version and integrity of each package, cross-checked between package.json,
// package-lock.json and what `npm ci` actually put in node_modules.
function resolvePackages() {
  const pkg = readJson(join(HERE, "package.json"));
  const lock = readJson(join(HERE, "package-lock.json"));
  if (lock.lockfileVersion !== 3) fail(`package-lock.json: expected lockfileVersion 3, got ${lock.lockfileVersion}`);
  const packages = {};
  for (const name of new Set(FILES.map((f) => f.package))) {
    const wanted = pkg.dependencies?.[name];
    if (!wanted) fail(`package.json: ${name} is not in dependencies`);
    if (!/^\d+\.\d+\.\d+$/.test(wanted)) fail(`package.json: ${name} must be pinned to an exact version, got "${wanted}"`);
    const locked = lock.packages?.[`node_modules/${name}`];
    if (!locked) fail(`package-lock.json: ${name} is missing; run \`npm install\` in web/vendor`);
    if (locked.version !== wanted) {
      fail(`package-lock.json has ${name}@${locked.version} but package.json wants ${wanted}; run \`npm install\``);
    }
    if (!/^sha512-/.test(locked.integrity ?? "")) fail(`package-lock.json: ${name} has no sha512 integrity`);
    const installedPath = join(NODE_MODULES, name, "package.json");
    if (!existsSync(installedPath)) fail(`${name} is not installed; run \`npm ci\` in web/vendor (or use make)`);
    const installed = readJson(installedPath).version;
    if (installed !== wanted) fail(`node_modules has ${name}@${installed}, expected ${wanted}; run \`npm ci\``);
    packages[name] = { version: wanted, integrity: locked.integrity };
  }
  return packages;
}

// Drop a trailing source-map comment: we do not ship maps, and the browser would request one.
function stripSourceMap(text, file) {
  const lines = text.replace(/\s+$/, "").split("\n");
  const last = lines.at(-1);
  if (/^\/\/# sourceMappingURL=/.test(last) || /^\/\*# sourceMappingURL=.*\*\/$/.test(last)) {
    lines.pop();
    return `${lines.join("\n").replace(/\s+$/, "")}\n`;
  }
  if (text.includes("sourceMappingURL")) fail(`${file}: unexpected sourceMappingURL not at the end of the file`);
  return text;
}

// The exact bytes of every file under web/static/vendor/, keyed by "/"-separated path.
function expectedFiles() {
  const packages = resolvePackages();
  const out = new Map();
  const entries = [];
  for (const spec of FILES) {
    const srcPath = join(NODE_MODULES, spec.package, ...spec.source.split("/"));
    if (!existsSync(srcPath)) fail(`${spec.package}@${packages[spec.package].version} has no ${spec.source}`);
    let bytes = readFileSync(srcPath);
    if (/\.(js|mjs|css)$/.test(spec.file)) {
      const text = bytes.toString("utf8");
      const stripped = stripSourceMap(text, spec.file);
      if (stripped !== text) bytes = Buffer.from(stripped, "utf8");
    }
    if (spec.file.startsWith("licenses/") && bytes.toString("utf8").trim() === "") {
      fail(`${spec.package}: licence file ${spec.source} is empty`);
    }
    out.set(spec.file, bytes);
    entries.push({ ...spec, ...packages[spec.package], sha256: sha256(bytes) });
  }
  entries.sort((a, b) => (a.file < b.file ? -1 : a.file > b.file ? 1 : 0));
  const manifest = {
    comment: "Generated by web/vendor/vendor.mjs (make vendor). Do not edit; see web/vendor/README.md.",
    files: entries,
  };
  out.set(MANIFEST, Buffer.from(stableJson(manifest), "utf8"));
  return out;
}

async function checkModules(files) {
  for (const [file, ok] of Object.entries(MODULE_CHECKS)) {
    const url = `data:text/javascript;base64,${files.get(file).toString("base64")}`;
    let module;
    try {
      module = await import(url);
    } catch (error) {
      fail(`${file} does not load as a self-contained ES module: ${error.message}`);
    }
    if (!ok(module)) fail(`${file} does not have the expected exports (${Object.keys(module).join(", ")})`);
  }
}

function listDir(dir) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((d) => !d.isDirectory())
    .map((d) => relative(dir, join(d.parentPath ?? d.path, d.name)).split(sep).join("/"))
    .sort();
}

function check(files) {
  const problems = [];
  const present = new Set(listDir(OUT));
  for (const [file, bytes] of files) {
    if (!present.has(file)) problems.push(`missing: ${file}`);
    else if (!readFileSync(join(OUT, file)).equals(bytes)) problems.push(`differs: ${file}`);
  }
  for (const file of present) if (!files.has(file)) problems.push(`unexpected: ${file}`);
  if (problems.length) {
    console.error(`web/static/vendor/ is out of date with web/vendor (run \`make vendor\`):`);
    for (const p of problems) console.error(`  ${p}`);
    return false;
  }
  console.log(`web/static/vendor/ matches web/vendor/package-lock.json (${files.size} files).`);
  return true;
}

function write(files) {
  for (const file of listDir(OUT)) {
    if (!files.has(file)) {
      rmSync(join(OUT, file));
      console.log(`removed ${file}`);
    }
  }
  for (const [file, bytes] of files) {
    const path = join(OUT, ...file.split("/"));
    mkdirSync(dirname(path), { recursive: true });
    writeFileSync(path, bytes);
    console.log(`wrote ${file} (${bytes.length} bytes)`);
  }
}

async function main(argv) {
  const args = argv.slice(2);
  const unknown = args.filter((a) => a !== "--check");
  if (unknown.length) fail(`unknown argument(s): ${unknown.join(" ")}; usage: node vendor.mjs [--check]`);
  const files = expectedFiles();
  await checkModules(files);
  if (args.includes("--check")) return check(files) ? 0 : 1;
  write(files);
  return 0;
}

try {
  process.exitCode = await main(process.argv);
} catch (error) {
  if (!(error instanceof VendorError)) throw error;
  console.error(`vendor.mjs: ${error.message}`);
  process.exitCode = 1;
}
