// The bundle run with LiteRT.js: text encoder, UNet (with classifier-free guidance when the bundle was
// exported with it) and decoder, each .tflite called through its named signature with the manifest's
// input/output names and fixed shapes, as runtime/pipeline.py BundlePipeline does with the LiteRT interpreter.
import { getDefaultEnvironment, loadAndCompile, loadLiteRt, supportsFeature, Tensor } from "@litertjs/core";
import { BundleError, TENSOR_TYPES } from "./bundle.js";
import { sample } from "./sampler.js";

const numel = (shape) => shape.reduce((p, s) => p * s, 1);

/**
 * Loads the LiteRT.js wasm runtime from `wasmDir` once: the threaded build when the page is cross-origin
 * isolated (serve-bundle sends COOP/COEP), else the single-threaded one. LiteRT's own log lines go to
 * `log(level, line)` instead of the console. Returns {threads, accelerator}.
 */
export async function initLiteRt(wasmDir, log) {
  const threads = Boolean(self.crossOriginIsolated) && (await supportsFeature("relaxedSimd")) &&
    (await supportsFeature("threads"));
  // LiteRT prints "INFO: [file.cc:N] ...", "WARNING: ...", "ERROR: ..." on stderr; anything else there is an error
  const level = (line) => (/^INFO\b/.test(line) ? "info" : /^WARNING\b/.test(line) ? "warn" : "error");
  // read by the Emscripten loader of the wasm module
  self.Module = { print: (line) => log("info", line), printErr: (line) => log(level(line), line) };
  await loadLiteRt(String(wasmDir), { threads });
  const accelerator = getDefaultEnvironment().webGpuDevice ? "webgpu" : "wasm";
  return { threads, accelerator };
}

/** One .tflite of the bundle, compiled for `accelerator`, checked against its manifest entry. */
export class Component {
  static async create(bytes, entry, accelerator) {
    const model = await loadAndCompile(bytes, { accelerator });
    const runner = model.signatures[entry.signature];
    if (!runner) {
      throw new BundleError(`${entry.file} has no signature ${JSON.stringify(entry.signature)} (it has ` +
        `${JSON.stringify(Object.keys(model.signatures))}); the file does not belong to this manifest, re-export ` +
        "the bundle");
    }
    const describe = (list) => list.map((t) => `${t.name} ${JSON.stringify(Array.from(t.shape))} ${t.dtype}`)
      .sort().join(", ");
    for (const [what, found, expected] of [["inputs", runner.getInputDetails(), entry.inputs],
      ["outputs", runner.getOutputDetails(), entry.outputs]]) {
      if (describe(found) !== describe(expected)) {
        throw new BundleError(`${entry.file}: its ${what} are ${describe(found)}, the manifest says ` +
          `${describe(expected)}; the file does not belong to this manifest, re-export the bundle`);
      }
    }
    return new Component(model, runner, entry);
  }

  constructor(model, runner, entry) {
    this.model = model;
    this.runner = runner;
    this.entry = entry;
  }

  /** inputs {name: TypedArray} in the manifest's shapes -> {output name: TypedArray}. */
  async run(inputs) {
    const tensors = {};
    try {
      for (const spec of this.entry.inputs) {
        const value = inputs[spec.name];
        const Typed = TENSOR_TYPES[spec.dtype];
        if (!(value instanceof Typed) || value.length !== numel(spec.shape)) {
          throw new BundleError(`${this.entry.file}: input ${spec.name} must be ${spec.dtype} of shape ` +
            `${JSON.stringify(spec.shape)} (fixed at export)`);
        }
        tensors[spec.name] = new Tensor(value, spec.shape);
      }
      const outputs = await this.runner.run(tensors);
      const result = {};
      for (const [name, tensor] of Object.entries(outputs)) {
        result[name] = await tensor.data();
        tensor.delete();
      }
      return result;
    } finally {
      for (const t of Object.values(tensors)) t.delete();
    }
  }
}

/** The three components + tokenizer of a verified bundle: encode, sample, decode. */
export class BundleRunner {
  constructor(manifest, components, tokenizer) {
    this.manifest = manifest;
    this.components = components;
    this.tokenizer = tokenizer;
    this.batch = manifest.image.batch_size;
  }

  static async create(manifest, files, tokenizer, accelerator) {
    const components = {};
    for (const [name, entry] of Object.entries(manifest.components)) {
      components[name] = await Component.create(files[entry.file], entry, accelerator);
    }
    return new BundleRunner(manifest, components, tokenizer);
  }

  /** Guidance baked into the bundle's UNet batch: > 1 means [uncond, cond] at batch 2B. */
  get guided() {
    return this.manifest.sampler.guidance > 1.0;
  }

  /** One prompt (repeated) or batch_size prompts -> context Float32Array (B, T, D). */
  async encode(prompts) {
    prompts = typeof prompts === "string" ? [prompts] : prompts;
    if (prompts.length === 1) prompts = new Array(this.batch).fill(prompts[0]);
    if (prompts.length !== this.batch) {
      throw new BundleError(`this bundle was exported for batch ${this.batch}; give one prompt or ${this.batch}`);
    }
    return (await this.components.text_encoder.run({ ids: this.tokenizer.encode(prompts) })).context;
  }

  /** context (+ uncond context with guidance) -> sampler-space latents (B, C, h, w). */
  async sample(context, uncond, section, guidance, noise, callback) {
    const unet = this.components.unet;
    const shape = this.manifest.image.latent_shape; // [B, C, h, w]
    let model;
    if (this.guided) {
      if (!(guidance > 1.0)) throw new BundleError("this bundle's UNet runs with guidance; give a guidance scale > 1");
      const both = new Float32Array(uncond.length + context.length); // (2B, T, D): [uncond, cond]
      both.set(uncond);
      both.set(context, uncond.length);
      const g = Math.fround(guidance);
      model = async (x, t) => {
        const xx = new Float32Array(2 * x.length);
        xx.set(x);
        xx.set(x, x.length);
        const timestep = new Float32Array(2 * shape[0]).fill(t);
        const out = (await unet.run({ sample: xx, timestep, context: both })).output;
        const mixed = new Float32Array(x.length); // u + g * (c - u), float32 at each operation
        for (let j = 0; j < x.length; j++) {
          const u = out[j];
          mixed[j] = u + Math.fround(g * Math.fround(out[x.length + j] - u));
        }
        return mixed;
      };
    } else {
      model = async (x, t) => {
        const timestep = new Float32Array(shape[0]).fill(t);
        return (await unet.run({ sample: x, timestep, context })).output;
      };
    }
    return sample(model, shape, section, noise, callback);
  }

  /** latents (B, C, h, w) -> images Float32Array (B, H, W, 3) in [0, 1]. */
  async decode(latents) {
    return (await this.components.decoder.run({ latents })).image;
  }
}
