// The player without the page: what a run needs (bundle, runner, the sampler tables written beside the player,
// the bundle's LoRA packs) and a run from a user's settings to images. view.js owns the DOM and calls it; tests
// call the pure parts (sectionFor, settings) in Node.
//
//     const player = await openPlayer(bundleUrl, {wasm, log, status});
//     const r = await player.run({prompt: "a red circle", seed: 0, size: [512, 768], loras: {"style": 0.8}});
//     const r = await player.run({prompt, controlImage: image, controlStrength: 0.8, picture: image, mask: alpha});
//     // images: {data: Float32Array (H, W, C) in [0, 1], height, width, channels} (conditioning.js fromRgba)
//     // r.images: Float32Array (B, H, W, 3) in [0, 1]; r.shape; r.seconds; r.notes (e.g. a prompt cut short)
import { BundleError, imageSizes, loadBundle } from "./bundle.js";
import { checkPackFor, readPack } from "./lora.js";
import { numpyNoise } from "./noise.js";
import { BundleRunner, initLiteRt } from "./runtime.js";
import { BundleTokenizer } from "./tokenizer.js";

const PACKS = "loras/index.json";

async function fetchOptional(url) {
  const response = await fetch(url, { cache: "no-store" });
  return response.ok ? new Uint8Array(await response.arrayBuffer()) : null;
}

/** The sampler section for (sampler, steps): the manifest's own, or one of the player's tables (player.json). */
export function sectionFor(manifest, schedules, sampler, steps) {
  const own = manifest.sampler;
  if (sampler === own.name && steps === own.steps) return own;
  const section = schedules[sampler]?.[String(steps)];
  if (!section) {
    throw new BundleError(`sampler ${sampler} with ${steps} steps is not offered for this bundle; choose one from the ` +
      "lists");
  }
  return section;
}

/** A user's settings checked and completed from the bundle's defaults: {prompt, negative, seed, section, guidance,
 * size, loras: [[name, strength]]}. */
export function settings(manifest, schedules, packs, { prompt = "", negative = "", seed = 0, sampler = null,
  steps = null, guidance = null, size = null, loras = {}, controlImage = null, controlStrength = 1,
  controlStart = 0, controlEnd = 1, picture = null, mask = null } = {}) {
  if (!/^\d+$/.test(String(seed))) throw new BundleError(`the seed must be a whole number >= 0, got ${JSON.stringify(seed)}`);
  const sizes = imageSizes(manifest);
  const chosen = size ?? sizes[0];
  if (!sizes.some(([h, w]) => h === chosen[0] && w === chosen[1])) {
    throw new BundleError(`this bundle has no ${chosen[1]}x${chosen[0]} size; it holds ` +
      `${sizes.map(([h, w]) => `${w}x${h}`).join(", ")}`);
  }
  const strengths = Object.entries(loras).map(([name, s]) => {
    if (!(name in packs)) throw new BundleError(`no LoRA pack ${JSON.stringify(name)} in this bundle`);
    const value = Number(s);
    if (!Number.isFinite(value) || Math.abs(value) > 100) {
      throw new BundleError(`a LoRA strength is a number from -100 to 100, got ${JSON.stringify(s)}`);
    }
    return [name, value];
  });
  if (controlImage && !manifest.control) {
    throw new BundleError("this bundle has no control model; export it with one (export --control) to use a control " +
      "image");
  }
  const strength = Number(controlStrength);
  if (!Number.isFinite(strength) || Math.abs(strength) > 100) {
    throw new BundleError(`the control strength is a number from -100 to 100, got ${JSON.stringify(controlStrength)}`);
  }
  if (!(0 <= controlStart && controlStart <= controlEnd && controlEnd <= 1)) {
    throw new BundleError(`control start and end are fractions with 0 <= start <= end <= 1, got ${controlStart}, ` +
      `${controlEnd}`);
  }
  if ((picture || mask) && !("encoder" in manifest.components)) {
    throw new BundleError("this bundle has no image encoder; export it with one (export --inpaint) to repaint an image");
  }
  return { prompt, negative, seed: String(seed), section: sectionFor(manifest, schedules, sampler ?? manifest.sampler.name,
    steps ?? manifest.sampler.steps), guidance: guidance ?? manifest.sampler.guidance, size: chosen, loras: strengths,
  controlImage, controlStrength: strength, controlStart, controlEnd, picture, mask };
}

export class Player {
  constructor({ manifest, runner, runtime, schedules, packages, packs }) {
    Object.assign(this, { manifest, runner, runtime, schedules, packages, packs });
    this.applied = "[]"; // the packs and strengths the runner's weights hold now
  }

  /** Settings (see `settings`) -> {images, shape, seconds, notes}; status(text) is told each step. */
  async run(options, status = () => {}, noise = null) {
    const s = settings(this.manifest, this.schedules, this.packs, options);
    const notes = [];
    const t0 = performance.now();
    const wanted = s.loras.filter(([, v]) => v !== 0);
    if (JSON.stringify(wanted) !== this.applied) { // a strength change is a re-patch of the touched files
      status("applying LoRA packs");
      await this.runner.setLoras(wanted.map(([name, v]) => [this.packs[name], v]));
      this.applied = JSON.stringify(wanted);
    }
    const t1 = performance.now();
    const warn = (line) => notes.push(line);
    const context = await this.runner.encode(s.prompt, warn);
    const uncond = this.runner.guided ? await this.runner.encode(s.negative, warn) : null;
    if (context.cut) {
      const limit = (this.runner.tokenizer.maxLength - 2) * this.runner.tokenizer.maxChunks;
      notes.push(`the prompt is longer than the ${limit} tokens this bundle takes; its end was cut off`);
    }
    const extra = {};
    if (s.controlImage) {
      Object.assign(extra, { hint: this.runner.controlHint(s.controlImage, s.size), strength: s.controlStrength,
        start: s.controlStart, end: s.controlEnd });
    }
    if (s.picture || s.mask) Object.assign(extra, await this.runner.inpaintInputs(s.picture, s.mask, s.size));
    const t2 = performance.now();
    const latents = await this.runner.sample(context, uncond, s.section, s.guidance, noise ?? numpyNoise(s.seed),
      s.size, (i, n) => status(`step ${i + 1} of ${n}`), extra);
    const t3 = performance.now();
    const images = await this.runner.decode(latents, s.size);
    const t4 = performance.now();
    const seconds = { loras: (t1 - t0) / 1000, encode: (t2 - t1) / 1000, sample: (t3 - t2) / 1000,
      decode: (t4 - t3) / 1000, total: (t4 - t0) / 1000 };
    return { images, shape: [this.manifest.image.batch_size, ...s.size, 3], seconds, steps: s.section.timesteps.length,
      notes };
  }
}

/** Loads, checks and compiles the bundle at `base` (the folder above the player) with its packs: a Player. */
export async function openPlayer(base, { wasm, log, status, playerJson }) {
  const { manifest, files } = await loadBundle(base, (name) => status(`reading ${name}`));
  const text = (name) => JSON.parse(new TextDecoder().decode(files[name]));
  const hasConfig = manifest.tokenizer.files.some((f) => f.file === "tokenizer_config.json");
  const tokenizer = new BundleTokenizer(text(manifest.tokenizer.file), hasConfig ? text("tokenizer_config.json") : {},
    manifest.tokenizer);
  const packs = {};
  const index = await fetchOptional(new URL(PACKS, base));
  for (const { file } of index ? JSON.parse(new TextDecoder().decode(index)).packs : []) {
    status(`reading loras/${file}`);
    const bytes = await fetchOptional(new URL(`loras/${file}`, base));
    if (!bytes) throw new BundleError(`loras/${file} is listed in ${PACKS} but missing; run export-lora again`);
    const pack = readPack(bytes, `loras/${file}`);
    checkPackFor(pack, manifest, `loras/${file}`);
    packs[file.replace(/\.lorapack$/, "")] = pack;
  }
  status("loading LiteRT.js");
  const runtime = await initLiteRt(wasm, log);
  status(`compiling the models (${runtime.accelerator})`);
  const runner = await BundleRunner.create(manifest, files, tokenizer, runtime.accelerator);
  return new Player({ manifest, runner, runtime, schedules: playerJson.schedules, packages: playerJson.packages, packs });
}
