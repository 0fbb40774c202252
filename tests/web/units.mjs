// The player's noise, tokenizer and sampler loop in Node, for tests/test_web_player.py to compare with numpy
// and the Python runtime.
//
//     node units.mjs PLAYER_DIR < job.json > result.json
//
// PLAYER_DIR holds the player's modules with a node_modules next to them (tokenizer.js imports
// @huggingface/tokenizers). job: {noise: [{seed, shapes}], tokenizer: {json, config, spec, prompts},
// sampler: [{section, shape, noise: [base64 float32], weight}]}. Arrays come back as base64 float32/int32.
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const dir = process.argv[2];
const load = (name) => import(pathToFileURL(path.join(dir, name)).href);
const { numpyNoise } = await load("noise.js");
const { sample } = await load("sampler.js");
const { BundleTokenizer } = await load("tokenizer.js");

const b64 = (typed) => Buffer.from(typed.buffer, typed.byteOffset, typed.byteLength).toString("base64");
const f32s = (text) => {
  const buf = Buffer.from(text, "base64");
  return new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
};

const job = JSON.parse(fs.readFileSync(0, "utf8"));
const out = { noise: [], tokenizer: null, sampler: [] };
for (const { seed, shapes } of job.noise ?? []) {
  const draw = numpyNoise(seed);
  out.noise.push(shapes.map((shape) => b64(draw(shape))));
}
if (job.tokenizer) {
  const { json, config, spec, prompts } = job.tokenizer;
  out.tokenizer = b64(new BundleTokenizer(json, config, spec).encode(prompts));
}
for (const { section, shape, noise, weight } of job.sampler ?? []) {
  // the toy model of the test: out = tanh(w * x + t / 1000), float32 at each operation
  const w = Math.fround(weight);
  const model = async (x, t) => {
    const b = Math.fround(t / 1000), y = new Float32Array(x.length);
    for (let j = 0; j < x.length; j++) y[j] = Math.tanh(Math.fround(Math.fround(w * x[j]) + b));
    return y;
  };
  let k = 0;
  const draws = () => f32s(noise[k++]);
  out.sampler.push(b64(await sample(model, shape, section, draws)));
}
process.stdout.write(JSON.stringify(out));
