// A bundle folder read over HTTP as runtime/manifest.py reads it from disk: manifest.json, its format and
// schema version, then every file it names (components, tokenizer files), each checked against its sha256.
// Nothing outside the bundle folder is read: file names must be plain names.

export const SCHEMA_VERSION = 2; // the newest manifest schema this player reads (runtime/manifest.py SCHEMA_VERSION)
export const READABLE_SCHEMAS = [1, 2]; // every schema it reads (runtime/manifest.py READABLE_SCHEMAS)
export const FORMAT = "mobilediffusion-tflite-bundle";
export const MANIFEST = "manifest.json";
export const COMPONENTS = ["text_encoder", "unet", "decoder"];
// the tensor types the page passes to and from LiteRT.js: @litertjs/core 2.5.3 knows float32, int32 and uint8 only
// (a model with an int16 input or output fails with "Element type INT16 is not supported"), so the int16 inputs and
// outputs of int8_a16 bundles (schema 2, "quantization") cannot be fed or read, and such a bundle is refused
export const TENSOR_TYPES = { float32: Float32Array, int32: Int32Array };
const MANIFEST_KEYS = ["schema_version", "format", "model", "image", "tokenizer", "sampler", "components",
  "verification"];
// what a page can hold: LiteRT.js's WebAssembly memory is at most 2 GiB (every build: its memory's maximum is
// 32768 pages), and the models, their packed weights and the tensors all live in it; an ArrayBuffer over 2 GiB
// is refused by some browsers
export const LIMITS = { heapBytes: 2 ** 31, fileBytes: 2 ** 31 };
export const WEB_EXPORT = "mobilediffusion export --precision int8_dynamic --web (with --budget 1.8GB to check it " +
  "at export), or a smaller size";

/** A bundle that cannot be used as it is (missing, altered, of another schema): shown, nothing runs. */
export class BundleError extends Error {
  constructor(message) {
    super(message);
    this.name = "BundleError";
  }
}

async function fetchFile(url, what, name) {
  let response;
  try {
    response = await fetch(url, { cache: "no-store" });
  } catch (e) {
    throw new BundleError(`${what}: ${name} could not be read (${e.message}); serve the bundle folder with ` +
      "`mobilediffusion serve-bundle DIR` and open the address it prints");
  }
  if (!response.ok) {
    throw new BundleError(`${what}: ${name} is missing from the bundle (HTTP ${response.status}); the bundle is ` +
      "incomplete, re-export it");
  }
  return new Uint8Array(await response.arrayBuffer());
}

/** The lowercase hex sha256 of `bytes` (WebCrypto; needs a secure context such as http://127.0.0.1). */
export async function sha256Hex(bytes) {
  if (!globalThis.crypto?.subtle) {
    throw new BundleError("this page cannot check the bundle's files: WebCrypto needs a secure context; open the " +
      "page through `mobilediffusion serve-bundle DIR` (http://127.0.0.1)");
  }
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The manifest's format, schema version and top-level keys, as runtime/manifest.py read_manifest checks them. */
export function checkManifest(manifest) {
  const isObject = manifest && typeof manifest === "object" && !Array.isArray(manifest);
  const found = isObject ? manifest.format : typeof manifest;
  if (found !== FORMAT) {
    throw new BundleError(`${MANIFEST} is not a ${FORMAT} manifest (format ${JSON.stringify(found)}); ` +
      "re-export the bundle");
  }
  const version = manifest.schema_version;
  if (!READABLE_SCHEMAS.includes(version)) {
    const newer = Number.isInteger(version) && version > SCHEMA_VERSION;
    throw new BundleError(`this bundle has schema version ${JSON.stringify(version)}, but this player reads versions ` +
      `${READABLE_SCHEMAS.join(", ")}; ` + (newer ? "write a newer player next to it (`mobilediffusion web DIR` with the " +
      "mobilediffusion that exported it)" : "re-export the bundle with this version of mobilediffusion"));
  }
  const missing = MANIFEST_KEYS.filter((k) => !(k in manifest));
  if (missing.length) {
    throw new BundleError(`${MANIFEST} lacks the keys ${JSON.stringify(missing)}; the bundle is incomplete, ` +
      "re-export it");
  }
  const absent = COMPONENTS.filter((c) => !(c in manifest.components));
  if (absent.length) {
    throw new BundleError(`this bundle holds only ${JSON.stringify(Object.keys(manifest.components).sort())}; ` +
      `running it needs all of ${JSON.stringify(COMPONENTS)} (missing ${JSON.stringify(absent)}): export with ` +
      "components 'all'");
  }
  checkTensorTypes(manifest);
}

/** Every component input and output is of a type in TENSOR_TYPES; else a BundleError naming the precision. */
function checkTensorTypes(manifest) {
  const found = [], precisions = new Set();
  for (const [name, entry] of Object.entries(manifest.components)) {
    for (const t of [...entry.inputs, ...entry.outputs]) {
      if (Object.hasOwn(TENSOR_TYPES, t.dtype)) continue;
      found.push(`${name} ${t.name} (${t.dtype})`);
      precisions.add(entry.precision);
    }
  }
  if (found.length) {
    throw new BundleError(`this bundle was exported at precision ${[...precisions].join("/")}: its tensors ` +
      `${found.join(", ")} are of a type LiteRT.js cannot pass in or out of a model (it takes ` +
      `${Object.keys(TENSOR_TYPES).join(", ")} and uint8), so the web player cannot run it; export the bundle ` +
      "again for the web at precision fp16, or int8_dynamic for int8 weights with float inputs and outputs " +
      "(`mobilediffusion export --precision int8_dynamic --web`, or the Export TFLite Bundle node); the Python " +
      "runtime runs this one (`mobilediffusion run-bundle DIR PROMPT`)");
  }
}

/** A component's signatures [{signature, size, tokens, inputs, outputs}] (runtime/manifest.py signatures_of). */
export function signaturesOf(entry) {
  return entry.signatures ?? [{ signature: entry.signature, size: null, tokens: null, inputs: entry.inputs,
    outputs: entry.outputs }];
}

/** The [H, W] sizes a bundle runs at, the default first. */
export function imageSizes(manifest) {
  return manifest.image.sizes ?? [[manifest.image.height, manifest.image.width]];
}

/**
 * BundleError when the bundle cannot run in a page: a file over the browser's buffer limit, or more memory than the
 * page's WebAssembly heap holds (the manifest's figure measured at export; without one, twice the files' size).
 */
export function checkBrowserLimits(manifest) {
  const gb = (n) => `${(n / 1e9).toFixed(2)} GB`;
  for (const entry of Object.values(manifest.components)) {
    if (entry.bytes >= LIMITS.fileBytes) {
      throw new BundleError(`${entry.file} is ${gb(entry.bytes)}, more than a browser holds in one buffer ` +
        `(${gb(LIMITS.fileBytes)}); export a smaller bundle for the web: ${WEB_EXPORT}`);
    }
  }
  const files = Object.values(manifest.components).reduce((n, e) => n + e.bytes, 0);
  const measured = manifest.memory?.generation_peak_bytes;
  const need = measured ?? 2 * files;
  if (need >= LIMITS.heapBytes) {
    throw new BundleError(`this bundle needs about ${gb(need)} while it runs (${measured ? "measured at export" :
      "estimated from its files"}), more than the ${gb(LIMITS.heapBytes)} a page's WebAssembly memory holds ` +
      `(LiteRT.js); export a smaller bundle for the web: ${WEB_EXPORT}`);
  }
  return need;
}

function* namedFiles(manifest) {
  for (const [name, entry] of Object.entries(manifest.components)) yield [name, entry];
  for (const entry of manifest.tokenizer.files) yield ["tokenizer", entry];
}

/**
 * Loads the bundle at `base` (a URL ending in "/"): {manifest, files: {file name: Uint8Array}}.
 * `progress(message)` is told each file. Throws BundleError naming the problem.
 */
export async function loadBundle(base, progress = () => {}) {
  progress(MANIFEST);
  const text = new TextDecoder().decode(await fetchFile(new URL(MANIFEST, base), "bundle", MANIFEST));
  let manifest;
  try {
    manifest = JSON.parse(text);
  } catch (e) {
    throw new BundleError(`${MANIFEST} is not valid JSON (${e.message}); re-export the bundle`);
  }
  checkManifest(manifest);
  checkBrowserLimits(manifest); // before any model file is fetched
  const files = {};
  for (const [what, entry] of namedFiles(manifest)) {
    const name = entry.file ?? "";
    if (!name || /[/\\]/.test(name) || name === "." || name === "..") {
      throw new BundleError(`the manifest names ${what} file ${JSON.stringify(name)}; only plain file names inside ` +
        "the bundle are allowed");
    }
    progress(`${name} (checking sha256)`);
    const bytes = await fetchFile(new URL(name, base), what, name);
    const digest = await sha256Hex(bytes);
    if (digest !== entry.sha256) {
      throw new BundleError(`${what}: ${name} does not match the manifest (sha256 ${digest.slice(0, 12)}..., ` +
        `expected ${String(entry.sha256).slice(0, 12)}...); the file was changed or damaged, re-export the bundle`);
    }
    files[name] = bytes;
  }
  return { manifest, files };
}
