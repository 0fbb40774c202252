// The bundle run with LiteRT.js, as runtime/pipeline.py BundlePipeline runs it with the LiteRT interpreter: the
// text encoder over each prompt's chunks (emphasis against the empty prompt), the UNet (classifier-free guidance
// when the bundle was exported with it) and the decoder, each .tflite called through the signature whose input
// shapes the call has (one per image size and context length, over shared weights), with LoRA packs patched into
// the files' bytes before they are compiled.
import { getDefaultEnvironment, loadAndCompile, loadLiteRt, supportsFeature, Tensor } from "@litertjs/core";
import { BundleError, TENSOR_TYPES, signaturesOf } from "./bundle.js";
import { patched } from "./lora.js";
import { batchContexts, mixGuidance, sample } from "./sampler.js";

const numel = (shape) => shape.reduce((p, s) => p * s, 1);
const same = (a, b) => a.length === b.length && a.every((v, i) => v === b[i]);

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

/** One .tflite of the bundle, compiled for `accelerator`, its signatures checked against the manifest entry. */
export class Component {
  static async create(bytes, entry, accelerator) {
    const model = await loadAndCompile(bytes, { accelerator });
    const describe = (list) => list.map((t) => `${t.name} ${JSON.stringify(Array.from(t.shape))} ${t.dtype}`)
      .sort().join(", ");
    const signatures = [];
    for (const spec of signaturesOf(entry)) {
      const runner = model.signatures[spec.signature];
      if (!runner) {
        throw new BundleError(`${entry.file} has no signature ${JSON.stringify(spec.signature)} (it has ` +
          `${JSON.stringify(Object.keys(model.signatures))}); the file does not belong to this manifest, re-export ` +
          "the bundle");
      }
      for (const [what, found, expected] of [["inputs", runner.getInputDetails(), spec.inputs],
        ["outputs", runner.getOutputDetails(), spec.outputs]]) {
        if (describe(found) !== describe(expected)) {
          throw new BundleError(`${entry.file}: its ${what} are ${describe(found)}, the manifest says ` +
            `${describe(expected)}; the file does not belong to this manifest, re-export the bundle`);
        }
      }
      signatures.push({ spec, runner });
    }
    return new Component(model, signatures, entry);
  }

  constructor(model, signatures, entry) {
    this.model = model;
    this.signatures = signatures;
    this.entry = entry;
  }

  /** inputs {name: {data: TypedArray, shape}} -> {output name: TypedArray}, through the signature of those shapes. */
  async run(inputs) {
    const match = this.signatures.find(({ spec }) => spec.inputs.every((i) => same(i.shape, inputs[i.name]?.shape ?? [])));
    if (!match) {
      const takes = this.signatures.map(({ spec }) => spec.inputs.map((i) => `${i.name} ${JSON.stringify(i.shape)}`)
        .join(", ")).join(" or ");
      throw new BundleError(`${this.entry.file}: no signature takes these input shapes; it takes ${takes}`);
    }
    const tensors = {};
    try {
      for (const spec of match.spec.inputs) {
        const { data } = inputs[spec.name];
        if (!(data instanceof TENSOR_TYPES[spec.dtype]) || data.length !== numel(spec.shape)) {
          throw new BundleError(`${this.entry.file}: input ${spec.name} must be ${spec.dtype} of shape ` +
            `${JSON.stringify(spec.shape)}`);
        }
        tensors[spec.name] = new Tensor(data, spec.shape);
      }
      const outputs = await match.runner.run(tensors);
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

  delete() {
    this.model.delete?.();
  }
}

/** The three components + tokenizer of a verified bundle: encode, sample, decode; LoRA packs by setLoras. */
export class BundleRunner {
  constructor(manifest, files, components, tokenizer, accelerator) {
    this.manifest = manifest;
    this.files = files;
    this.components = components;
    this.tokenizer = tokenizer;
    this.accelerator = accelerator;
    this.batch = manifest.image.batch_size;
    this.loras = [];
  }

  static async create(manifest, files, tokenizer, accelerator) {
    const components = {};
    for (const [name, entry] of Object.entries(manifest.components)) {
      components[name] = await Component.create(files[entry.file], entry, accelerator);
    }
    return new BundleRunner(manifest, files, components, tokenizer, accelerator);
  }

  /** Guidance baked into the bundle's UNet batch: > 1 means [uncond, cond] at batch 2B. */
  get guided() {
    return this.manifest.sampler.guidance > 1.0;
  }

  /**
   * Run with these [pack, strength] pairs (replacing the ones before): the files they touch are patched and
   * compiled again; nothing else is. A failure leaves the components as they were.
   */
  async setLoras(packs) {
    const touched = new Set([...packs, ...this.loras].flatMap(([p]) => p.info.targets.map((t) => t.component)));
    const fresh = {};
    for (const name of touched) {
      const entry = this.manifest.components[name], bytes = this.files[entry.file];
      fresh[name] = await Component.create(patched(bytes, name, packs) ?? bytes, entry, this.accelerator);
    }
    for (const [name, component] of Object.entries(fresh)) {
      this.components[name].delete();
      this.components[name] = component;
    }
    this.loras = packs;
  }

  /**
   * One prompt (repeated) or batch_size prompts -> {context: Float32Array (B, T, D), shape, cut}: each prompt's
   * chunks through the text encoder, emphasis applied against the empty prompt, lengths repeated to a common one.
   */
  async encode(prompts, warn = () => {}) {
    prompts = typeof prompts === "string" ? [prompts] : prompts;
    if (prompts.length === 1) prompts = new Array(this.batch).fill(prompts[0]);
    if (prompts.length !== this.batch) {
      throw new BundleError(`this bundle was exported for batch ${this.batch}; give one prompt or ${this.batch}`);
    }
    const T = this.tokenizer.maxLength;
    const chunked = prompts.map((p) => this.tokenizer.chunks(p, warn));
    const weighted = chunked.some((c) => c.weights.some((w) => w !== 1));
    const rows = [];
    for (const c of chunked) for (let i = 0; i < c.k; i++) rows.push(c.ids.subarray(i * T, (i + 1) * T));
    if (weighted) rows.push(this.tokenizer.empty());
    const z = await this.encodeRows(rows); // rows x (T * D)
    const D = z[0].length / T;
    const contexts = [];
    chunked.forEach((c, p) => {
      const start = chunked.slice(0, p).reduce((n, x) => n + x.k, 0);
      const context = new Float32Array(c.k * T * D);
      for (let i = 0; i < c.k; i++) {
        const row = z[start + i], empty = weighted ? z[z.length - 1] : null;
        for (let t = 0; t < T; t++) {
          const w = c.weights[i * T + t];
          for (let d = 0; d < D; d++) {
            const v = row[t * D + d];
            context[(i * T + t) * D + d] = w === 1 ? v
              : Math.fround(Math.fround(Math.fround(v - empty[t * D + d]) * w) + empty[t * D + d]);
          }
        }
      }
      contexts.push({ data: context, shape: [1, c.k * T, D] });
    });
    const batched = batchContexts(contexts);
    return { ...batched, cut: Math.max(...chunked.map((c) => c.cut)) };
  }

  /** Token id rows (each max_length) -> their contexts, through the text encoder's batch-B signature B at a time. */
  async encodeRows(rows) {
    const B = this.batch, T = this.tokenizer.maxLength, out = [];
    for (let i = 0; i < rows.length; i += B) {
      const ids = new Int32Array(B * T);
      for (let b = 0; b < B; b++) ids.set(rows[Math.min(i + b, rows.length - 1)], b * T);
      const { context } = await this.components.text_encoder.run({ ids: { data: ids, shape: [B, T] } });
      const D = context.length / (B * T);
      for (let b = 0; b < B && i + b < rows.length; b++) out.push(context.slice(b * T * D, (b + 1) * T * D));
    }
    return out;
  }

  /** The latent shape [B, C, h, w] of an image size [H, W] the bundle holds. */
  latentShape([H, W]) {
    const [B, C, h] = this.manifest.image.latent_shape, f = this.manifest.image.height / h;
    return [B, C, H / f, W / f];
  }

  /** context (+ uncond with guidance) {data, shape} -> sampler-space latents (B, C, h, w) at `size` [H, W]. */
  async sample(context, uncond, section, guidance, noise, size, callback) {
    const unet = this.components.unet;
    const shape = this.latentShape(size);
    let model;
    if (this.guided) {
      if (!(guidance > 1.0)) throw new BundleError("this bundle's UNet runs with guidance; give a guidance scale > 1");
      const both = batchContexts([uncond, context]); // (2B, T, D): [uncond, cond]
      model = async (x, t) => {
        const xx = new Float32Array(2 * x.length);
        xx.set(x);
        xx.set(x, x.length);
        const timestep = new Float32Array(2 * shape[0]).fill(t);
        const out = (await unet.run({ sample: { data: xx, shape: [2 * shape[0], ...shape.slice(1)] },
          timestep: { data: timestep, shape: [2 * shape[0]] }, context: both })).output;
        return mixGuidance(out, guidance);
      };
    } else {
      model = async (x, t) => {
        const timestep = new Float32Array(shape[0]).fill(t);
        return (await unet.run({ sample: { data: x, shape }, timestep: { data: timestep, shape: [shape[0]] },
          context })).output;
      };
    }
    return sample(model, shape, section, noise, callback);
  }

  /** latents (B, C, h, w) at `size` -> images Float32Array (B, H, W, 3) in [0, 1]. */
  async decode(latents, size) {
    return (await this.components.decoder.run({ latents: { data: latents, shape: this.latentShape(size) } })).image;
  }
}
