// The page: checks and loads the bundle in the folder above it (<bundle>/web/ holds this player), then
// prompt, seed, sampler, steps -> image. window.mdPlayer is the same thing for scripts and tests:
//
//     await mdPlayer.ready;                       // rejects with the error the page shows
//     const r = await mdPlayer.run({prompt: "a red circle", seed: 0});
//     // r.image: base64 of the (B, H, W, 3) float32 image in [0, 1]; r.shape; r.seconds
//
// run() also takes negative, sampler, steps, guidance, and noise: a list of base64 float32 arrays used
// instead of numpy_noise(seed), one per draw (the start noise, then one per stochastic step).
import { loadBundle } from "./bundle.js";
import { numpyNoise } from "./noise.js";
import { BundleRunner, initLiteRt } from "./runtime.js";
import { BundleTokenizer } from "./tokenizer.js";

const BUNDLE = new URL("../", import.meta.url);
const WASM = new URL("./vendor/litertjs-core/wasm/", import.meta.url);
const $ = (id) => document.getElementById(id);

function log(level, line) {
  const row = document.createElement("div");
  row.className = level;
  row.textContent = line;
  $("log").append(row);
  if (level === "error") console.error(line);
  else if (level === "warn") console.warn(line);
}

function status(text) {
  $("status").textContent = text;
}

function showError(error) {
  const box = $("error");
  box.textContent = error?.message ?? String(error);
  box.hidden = false;
  status("");
}

function toBase64(typed) {
  const bytes = new Uint8Array(typed.buffer, typed.byteOffset, typed.byteLength);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

function fromBase64(text) {
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  return new Float32Array(bytes.buffer);
}

async function fetchJson(url, what) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) {
    throw new Error(`${what} is missing (HTTP ${response.status}); write the player again with ` +
      "`mobilediffusion web DIR`");
  }
  return response.json();
}

// --------------------------------------------------------------------------- loading
async function load() {
  const player = await fetchJson(new URL("player.json", import.meta.url), "web/player.json");
  const { manifest, files } = await loadBundle(BUNDLE, (name) => status(`reading ${name}`));
  const text = (name) => JSON.parse(new TextDecoder().decode(files[name]));
  const hasConfig = manifest.tokenizer.files.some((f) => f.file === "tokenizer_config.json");
  const tokenizer = new BundleTokenizer(text(manifest.tokenizer.file), hasConfig ? text("tokenizer_config.json") : {},
    manifest.tokenizer);
  status("loading LiteRT.js");
  const runtime = await initLiteRt(WASM, log);
  status(`compiling the models (${runtime.accelerator})`);
  const runner = await BundleRunner.create(manifest, files, tokenizer, runtime.accelerator);
  state = { manifest, runner, runtime, schedules: player.schedules, packages: player.packages };
  describe(state);
  return manifest;
}

function describe({ manifest: m, runtime, packages }) {
  const s = m.sampler, img = m.image;
  const precisions = [...new Set(Object.values(m.components).map((c) => c.precision))].join("/");
  $("details").textContent = `${m.model.family} model, ${img.width}x${img.height}, batch ${img.batch_size}, ` +
    `${precisions}; exported with ${s.name} ${s.steps} step(s)${s.guidance > 1 ? `, guidance ${s.guidance}` : ""}. ` +
    `LiteRT.js ${packages["@litertjs/core"]} on ${runtime.accelerator}${runtime.threads ? " (threads)" : ""}.`;
  const samplerBox = $("sampler");
  for (const name of Object.keys(state.schedules)) samplerBox.add(new Option(name, name, false, name === s.name));
  fillSteps(s.steps);
  samplerBox.addEventListener("change", () => fillSteps(null));
  // a field the bundle does not use is hidden and disabled: a disabled field is left out of the form's checks
  // (a hidden one is not, and a hidden guidance of 1 below its min="1.01" blocked every Generate click)
  const guided = s.guidance > 1;
  $("guidance-row").hidden = $("guidance").disabled = !guided;
  $("negative-row").hidden = $("negative").disabled = !guided;
  $("guidance").value = s.guidance;
  $("generate").disabled = false;
  status("ready");
}

function fillSteps(selected) {
  const box = $("steps"), counts = Object.keys(state.schedules[$("sampler").value]).map(Number);
  box.replaceChildren(...counts.map((n) => new Option(String(n), String(n), false, n === (selected ?? counts[0]))));
}

// --------------------------------------------------------------------------- running
/** The sampler section for (sampler, steps): the manifest's own, or one written next to the player. */
function sectionFor(sampler, steps) {
  const own = state.manifest.sampler;
  if (sampler === own.name && steps === own.steps) return own;
  const section = state.schedules[sampler]?.[String(steps)];
  if (!section) {
    throw new Error(`sampler ${sampler} with ${steps} steps is not offered for this bundle; choose one from the lists`);
  }
  return section;
}

function injected(list) {
  let k = 0;
  return () => {
    if (k >= list.length) throw new Error(`the run draws more noise than the ${list.length} array(s) given`);
    const z = list[k++];
    return typeof z === "string" ? fromBase64(z) : Float32Array.from(z);
  };
}

async function run({ prompt = "", negative = "", seed = 0, noise = null, sampler = null, steps = null,
  guidance = null } = {}) {
  await ready;
  const m = state.manifest, r = state.runner;
  if (!/^\d+$/.test(String(seed))) throw new Error(`the seed must be a whole number >= 0, got ${JSON.stringify(seed)}`);
  const section = sectionFor(sampler ?? m.sampler.name, steps ?? m.sampler.steps);
  const t0 = performance.now();
  const context = await r.encode(prompt);
  const uncond = r.guided ? await r.encode(negative) : null;
  const t1 = performance.now();
  const latents = await r.sample(context, uncond, section, guidance ?? m.sampler.guidance,
    noise ? injected(noise) : numpyNoise(String(seed)), (i, n) => status(`step ${i + 1} of ${n}`));
  const t2 = performance.now();
  const images = await r.decode(latents);
  const t3 = performance.now();
  show(images);
  const seconds = { encode: (t1 - t0) / 1000, sample: (t2 - t1) / 1000, decode: (t3 - t2) / 1000,
    total: (t3 - t0) / 1000 };
  status(`done in ${seconds.total.toFixed(2)} s (text ${seconds.encode.toFixed(2)} s, ${section.timesteps.length} ` +
    `UNet step(s) ${seconds.sample.toFixed(2)} s, decoder ${seconds.decode.toFixed(2)} s)`);
  const { batch_size: B, height: H, width: W } = m.image;
  return { image: toBase64(images), shape: [B, H, W, 3], seconds };
}

function show(images) {
  const { batch_size: B, height: H, width: W } = state.manifest.image;
  const canvases = [];
  for (let b = 0; b < B; b++) {
    const canvas = document.createElement("canvas");
    canvas.width = W;
    canvas.height = H;
    const ctx = canvas.getContext("2d"), pixels = ctx.createImageData(W, H);
    for (let p = 0; p < H * W; p++) {
      for (let ch = 0; ch < 3; ch++) {
        pixels.data[4 * p + ch] = Math.min(255, Math.max(0, Math.round(images[(b * H * W + p) * 3 + ch] * 255)));
      }
      pixels.data[4 * p + 3] = 255;
    }
    ctx.putImageData(pixels, 0, 0);
    canvases.push(canvas);
  }
  $("images").replaceChildren(...canvases);
}

async function onGenerate(event) {
  event.preventDefault();
  $("error").hidden = true;
  $("generate").disabled = true;
  try {
    await run({ prompt: $("prompt").value, negative: $("negative").value, seed: $("seed").value.trim(),
      sampler: $("sampler").value, steps: Number($("steps").value), guidance: Number($("guidance").value) });
  } catch (error) {
    showError(error);
  } finally {
    $("generate").disabled = false;
  }
}

let state = null;
const ready = load();
ready.catch(showError); // the page shows why it does not run; nothing else happens
$("form").addEventListener("submit", onGenerate);
window.mdPlayer = { ready, run };
