// The player's noise, tokenizer and sampler loop in Node, for tests/test_web_player.py to compare with numpy
// and the Python runtime.
//
//     node units.mjs PLAYER_DIR < job.json > result.json
//
// PLAYER_DIR holds the player's modules with a node_modules next to them (tokenizer.js imports
// @huggingface/tokenizers). job: {noise: [{seed, shapes}], tokenizer: {json, config, spec, prompts} (-> chunks),
// sampler: [{section, shape, noise: [base64 float32], weight}], guidance: [{out, g}], contexts: [[{data, shape}]],
// halves: base64 float32, pack: {bytes, components: {name: base64 file}, strengths}, sections: {manifest,
// schedules, asks: [[sampler, steps]]}, settings: {manifest, schedules, packs, asks: [options]}}. Arrays come back
// as base64 float32/int32/uint16/uint8; a thrown error as {error: message}.
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const dir = process.argv[2];
const load = (name) => import(pathToFileURL(path.join(dir, name)).href);
const { numpyNoise } = await load("noise.js");
const { batchContexts, mixGuidance, sample } = await load("sampler.js");
const { BundleTokenizer } = await load("tokenizer.js");
const { patched, readPack, toHalf } = await load("lora.js");
const { sectionFor, settings } = await load("player.js");
const { fit, prepareHint, prepareKnown, resizeBilinear, resizeNearest } = await load("conditioning.js");

const b64 = (typed) => Buffer.from(typed.buffer, typed.byteOffset, typed.byteLength).toString("base64");
const f32s = (text) => {
  const buf = Buffer.from(text, "base64");
  return new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
};

const bytes = (text) => new Uint8Array(Buffer.from(text, "base64"));
const attempt = (fn) => {
  try {
    return fn();
  } catch (e) {
    return { error: e.message };
  }
};

const job = JSON.parse(fs.readFileSync(0, "utf8"));
const out = { noise: [], sampler: [] };
for (const { seed, shapes } of job.noise ?? []) {
  const draw = numpyNoise(seed);
  out.noise.push(shapes.map((shape) => b64(draw(shape))));
}
if (job.tokenizer) {
  const { json, config, spec, prompts } = job.tokenizer;
  const tokenizer = new BundleTokenizer(json, config, spec);
  out.chunks = prompts.map((p) => {
    const c = tokenizer.chunks(p);
    return { ids: b64(c.ids), weights: b64(c.weights), k: c.k, cut: c.cut };
  });
}
out.guidance = (job.guidance ?? []).map(({ out: o, g }) => b64(mixGuidance(f32s(o), g)));
out.contexts = (job.contexts ?? []).map((list) => {
  const r = batchContexts(list.map(({ data, shape }) => ({ data: f32s(data), shape })));
  return { data: b64(r.data), shape: r.shape };
});
if (job.halves) out.halves = b64(Uint16Array.from(f32s(job.halves), toHalf));
if (job.pack) {
  const pack = readPack(bytes(job.pack.bytes), "pack");
  out.patched = Object.fromEntries(Object.entries(job.pack.components).map(([name, file]) => {
    const result = patched(bytes(file), name, job.pack.strengths.map((s) => [pack, s]));
    return [name, result === null ? null : b64(result)];
  }));
}
if (job.sections) {
  const { manifest, schedules, asks } = job.sections;
  out.sections = asks.map(([sampler, steps]) => attempt(() => sectionFor(manifest, schedules, sampler, steps)));
}
if (job.settings) {
  const { manifest, schedules, packs, asks } = job.settings;
  out.settings = asks.map((options) => attempt(() => settings(manifest, schedules, packs, options)));
}
if (job.conditioning) {
  // images {data (H, W, C) base64 float32, height, width, channels}; each op's result as base64 float32 or {error}
  const img = (o) => ({ ...o, data: f32s(o.data) });
  const flat = (r) => ({ data: b64(r.data), shape: r.shape ?? [r.height, r.width, r.channels] });
  out.conditioning = job.conditioning.map(({ op, image, mask, height, width, channels, latent, inpainting }) => attempt(() => {
    if (op === "nearest") return flat(resizeNearest(img(image), height, width));
    if (op === "nearest_floor") return flat(resizeNearest(img(image), height, width, false));
    if (op === "bilinear") return flat(resizeBilinear(img(image), height, width));
    if (op === "fit") return flat(fit(img(image), height, width));
    if (op === "hint") return flat(prepareHint(img(image), height, width, channels));
    const k = prepareKnown(img(image), img(mask), height, width, latent, inpainting);
    return Object.fromEntries(Object.entries(k).map(([n, v]) => [n, flat(v)]));
  }));
}
for (const { section, shape, noise, weight, known } of job.sampler ?? []) {
  // the toy model of the test: out = tanh(w * x + t / 1000), float32 at each operation
  const w = Math.fround(weight);
  const model = async (x, t) => {
    const b = Math.fround(t / 1000), y = new Float32Array(x.length);
    for (let j = 0; j < x.length; j++) y[j] = Math.tanh(Math.fround(Math.fround(w * x[j]) + b));
    return y;
  };
  let k = 0;
  const draws = () => f32s(noise[k++]);
  const keep = known ? { latents: f32s(known.latents), mask: f32s(known.mask) } : null;
  out.sampler.push(b64(await sample(model, shape, section, draws, null, keep)));
}
process.stdout.write(JSON.stringify(out));
