// LoRA packs in the page, as runtime/lora_pack.py applies them: a safetensors file whose metadata lists the
// bundle's tensors it updates (byte offset, type, shape, int8 scales) and whose tensors are low-rank factors
// (update = a @ b) or dense updates; at strength s a weight W becomes W + s * update in float32, stored back as
// float32, float16 (rounded to nearest even) or int8 (re-quantized per channel, symmetric, scale = max|W'| / 127).
import { BundleError } from "./bundle.js";

export const FORMAT = "mobilediffusion-lora-pack";
export const VERSION = 1;
const METADATA_KEY = "mobilediffusion_lora_pack";
const f32 = Math.fround;

/** A safetensors file's float32 tensors and metadata: {metadata, tensors: {name: {data: Float32Array, shape}}}. */
export function readSafetensors(bytes, what) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let header;
  try {
    const n = Number(view.getBigUint64(0, true));
    header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
    const tensors = {};
    for (const [name, t] of Object.entries(header)) {
      if (name === "__metadata__") continue;
      if (t.dtype !== "F32") throw new Error(`tensor ${name} is ${t.dtype}, not F32`);
      const [begin, end] = t.data_offsets;
      const data = new Float32Array(bytes.slice(8 + n + begin, 8 + n + end).buffer);
      if (data.length !== t.shape.reduce((p, s) => p * s, 1)) throw new Error(`tensor ${name} is cut short`);
      tensors[name] = { data, shape: t.shape };
    }
    return { metadata: header.__metadata__ ?? {}, tensors };
  } catch (e) {
    throw new BundleError(`${what} is not a readable LoRA pack (${e.message}); make it again with ` +
      "`mobilediffusion export-lora`");
  }
}

/** A pack's bytes -> {name, info, tensors}; BundleError naming what is wrong. */
export function readPack(bytes, what) {
  const { metadata, tensors } = readSafetensors(bytes, what);
  let info = null;
  try {
    info = JSON.parse(metadata[METADATA_KEY] ?? "null");
  } catch { /* reported below */ }
  if (!info || info.format !== FORMAT) throw new BundleError(`${what} is not a LoRA pack for a bundle`);
  if (info.version !== VERSION) {
    throw new BundleError(`${what} is a LoRA pack of version ${info.version}; this player reads version ${VERSION}`);
  }
  return { name: info.name, info, tensors };
}

/** BundleError unless every file the pack patches is this bundle's (same sha256). */
export function checkPackFor(pack, manifest, what) {
  for (const [component, file] of Object.entries(pack.info.bundle)) {
    const entry = manifest.components[component];
    if (!entry || entry.sha256 !== file.sha256) {
      throw new BundleError(`${what} was made for another bundle (its ${component} file differs); make the pack for ` +
        `this bundle: mobilediffusion export-lora ${pack.name} --bundle <this bundle>`);
    }
  }
}

function update(pack, t) {
  const size = t.shape.reduce((p, s) => p * s, 1);
  if (t.form === "dense") return pack.tensors[`${t.key}.delta`].data;
  const a = pack.tensors[`${t.key}.a`], b = pack.tensors[`${t.key}.b`];
  const [rows, r] = a.shape, cols = b.shape[1];
  const out = new Float32Array(size);
  for (let i = 0; i < rows; i++) {
    for (let k = 0; k < r; k++) {
      const aik = a.data[i * r + k];
      if (aik === 0) continue;
      const row = k * cols, at = i * cols;
      for (let j = 0; j < cols; j++) out[at + j] = f32(out[at + j] + f32(aik * b.data[row + j]));
    }
  }
  return out;
}

/** The component file's bytes with each [pack, strength] applied, or null when nothing changes (strength 0). */
export function patched(bytes, component, packs) {
  const updates = new Map(); // offset -> [target, summed update]
  for (const [pack, strength] of packs) {
    if (strength === 0) continue;
    const s = f32(strength);
    for (const t of pack.info.targets) {
      if (t.component !== component) continue;
      const u = update(pack, t), sum = updates.get(t.offset)?.[1] ?? new Float32Array(u.length);
      for (let j = 0; j < u.length; j++) sum[j] = f32(sum[j] + f32(s * u[j]));
      updates.set(t.offset, [t, sum]);
    }
  }
  if (!updates.size) return null;
  const out = bytes.slice();
  for (const [t, delta] of updates.values()) apply(out, t, delta);
  return out;
}

function apply(buf, t, delta) {
  const n = delta.length;
  if (t.dtype === "float32") {
    const w = new Float32Array(buf.buffer.slice(t.offset, t.offset + 4 * n));
    for (let j = 0; j < n; j++) w[j] = f32(w[j] + delta[j]);
    buf.set(new Uint8Array(w.buffer), t.offset);
  } else if (t.dtype === "float16") {
    const h = new Uint16Array(buf.buffer.slice(t.offset, t.offset + 2 * n));
    for (let j = 0; j < n; j++) h[j] = toHalf(f32(fromHalf(h[j]) + delta[j]));
    buf.set(new Uint8Array(h.buffer), t.offset);
  } else {
    requantize(buf, t, delta);
  }
}

function requantize(buf, t, delta) {
  const shape = t.shape, axis = t.axis, channels = shape[axis];
  const inner = shape.slice(axis + 1).reduce((p, s) => p * s, 1); // elements between two steps of the channel
  const n = delta.length;
  const q = new Int8Array(buf.buffer.slice(t.offset, t.offset + n));
  const scales = new Float32Array(buf.buffer.slice(t.scale_offset, t.scale_offset + 4 * channels));
  const channelOf = (j) => Math.floor(j / inner) % channels;
  const w = new Float32Array(n), peak = new Float32Array(channels);
  for (let j = 0; j < n; j++) {
    const c = channelOf(j);
    w[j] = f32(f32(q[j] * scales[c]) + delta[j]);
    peak[c] = Math.max(peak[c], Math.abs(w[j]));
  }
  const fresh = scales.map((s, c) => (peak[c] > 0 ? f32(peak[c] / 127) : s));
  for (let j = 0; j < n; j++) q[j] = Math.max(-127, Math.min(127, roundHalfEven(f32(w[j] / fresh[channelOf(j)]))));
  buf.set(new Uint8Array(q.buffer), t.offset);
  buf.set(new Uint8Array(fresh.buffer), t.scale_offset);
}

function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

const scratch = new Float32Array(1), bits = new Uint32Array(scratch.buffer);

/** IEEE half (as a uint16) -> number. */
export function fromHalf(h) {
  const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** A float32 value -> IEEE half (uint16), rounded to nearest even as numpy's astype(float16). */
export function toHalf(value) {
  scratch[0] = value;
  const x = bits[0], sign = (x >>> 16) & 0x8000, mant = x & 0x7fffff;
  let exp = (x >>> 23) & 0xff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  exp = exp - 127 + 15;
  if (exp >= 0x1f) return sign | 0x7c00;
  if (exp <= 0) { // a half subnormal (or zero)
    if (exp < -10) return sign;
    const full = mant | 0x800000, shift = 14 - exp;
    let half = full >>> shift;
    const rest = full & ((1 << shift) - 1), mid = 1 << (shift - 1);
    if (rest > mid || (rest === mid && (half & 1))) half += 1;
    return sign | half;
  }
  let half = (exp << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (half & 1))) half += 1; // a carry into the exponent is right too
  return sign | half;
}
