// The bundle run with LiteRT.js, as runtime/pipeline.py BundlePipeline runs it with the LiteRT interpreter: the
// text encoder over each prompt's chunks (emphasis against the empty prompt), the UNet (classifier-free guidance
// when the bundle was exported with it) and the decoder, each .tflite called through the signature whose input
// shapes the call has (one per image size and context length, over shared weights), with LoRA packs patched into
// the files' bytes before they are compiled. The UNet's call is built from its manifest inputs: a control model's
// residuals (res_*: an adapter's, run once, or a ControlNet's, run every step; zeros without a control image) and an
// inpainting UNet's concat; the encoder turns a picture into the latents a mask keeps.
import { getDefaultEnvironment, loadAndCompile, loadLiteRt, supportsFeature, Tensor } from "@litertjs/core";
import { BundleError, TENSOR_TYPES, signaturesOf } from "./bundle.js";
import { patched } from "./lora.js";
import { prepareHint, prepareKnown } from "./conditioning.js";
import { batchContexts, mixGuidance, sample } from "./sampler.js";

const numel = (shape) => shape.reduce((p, s) => p * s, 1);

/** {data, shape [b, ...]} -> {data, shape [B, ...]}: one item for every sample, or b items repeated (B = k b). */
function repeatBatch({ data, shape }, B) {
  const b = shape[0];
  if (b === B) return { data, shape };
  if (B % b !== 0) throw new BundleError(`${b} images cannot drive a batch of ${B}: give one, or one per image`);
  const out = new Float32Array((B / b) * data.length);
  for (let i = 0; i < B / b; i++) out.set(data, i * data.length);
  return { data: out, shape: [B, ...shape.slice(1)] };
}
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

  /** The signature spec whose inputs have these shapes ({name: shape}, some of the inputs); BundleError if none. */
  signatureFor(shapes) {
    const match = this.signatures.find(({ spec }) => Object.entries(shapes).every(([name, shape]) =>
      spec.inputs.some((i) => i.name === name && same(i.shape, shape))));
    if (!match) throw new BundleError(`${this.entry.file}: no signature takes inputs of shapes ${JSON.stringify(shapes)}`);
    return match.spec;
  }

  /** The shape of output `name` in the signature whose inputs have these shapes. */
  outputShape(name, shapes) {
    return Array.from(this.signatureFor(shapes).outputs.find((o) => o.name === name).shape);
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

  /** The control model's section of the manifest (component, hint {channels, factor}, ...), or null. */
  get control() {
    return this.manifest.control ?? null;
  }

  /** Whether the bundle has an image encoder (pictures to repaint). */
  get hasEncoder() {
    return "encoder" in this.components;
  }

  /** A control image {data (H, W, C), height, width, channels} -> the hint {data, shape [1, c, H, W]} at `size`. */
  controlHint(image, size) {
    if (!this.control) throw new BundleError("this bundle has no control model; export it with one (export --control)");
    const [, , h, w] = this.latentShape(size), { channels, factor } = this.control.hint;
    return prepareHint(image, factor * h, factor * w, channels);
  }

  /** A picture and mask -> what sample() takes to repaint the mask's white part: {known} or {concat}. */
  async inpaintInputs(picture, mask, size) {
    if (!this.hasEncoder) throw new BundleError("this bundle has no image encoder; export it with one (export --inpaint)");
    const [B, , h, w] = this.latentShape(size), f = this.manifest.image.height / this.manifest.image.latent_shape[2];
    const unetInputs = this.manifest.components.unet.inputs.map((i) => i.name);
    const inpainting = unetInputs.includes("concat");
    const k = prepareKnown(picture, mask, f * h, f * w, [h, w], inpainting);
    const encode = async (img) => (await this.components.encoder.run({ image: repeatBatch(img, B) })).latents;
    if (!inpainting) return { known: { latents: await encode(k.image), mask: k.mask.data } };
    const masked = await encode(k.maskedImage), plane = h * w, C = masked.length / (B * plane);
    const concat = new Float32Array(B * (1 + C) * plane);
    for (let b = 0; b < B; b++) {
      concat.set(k.hardMask.data, b * (1 + C) * plane);
      concat.set(masked.subarray(b * C * plane, (b + 1) * C * plane), (b * (1 + C) + 1) * plane);
    }
    return { concat: { data: concat, shape: [B, 1 + C, h, w] } };
  }

  /**
   * context (+ uncond with guidance) {data, shape} -> sampler-space latents (B, C, h, w) at `size` [H, W].
   * extra: {hint (controlHint's), strength, start, end} for a control image; {known} or {concat} from inpaintInputs.
   */
  async sample(context, uncond, section, guidance, noise, size, callback, extra = {}) {
    const unet = this.components.unet;
    const shape = this.latentShape(size);
    const k = this.guided ? 2 : 1, N = k * shape[0];
    if (this.guided && !(guidance > 1.0)) {
      throw new BundleError("this bundle's UNet runs with guidance; give a guidance scale > 1");
    }
    const ctx = this.guided ? batchContexts([uncond, context]) : context; // (2B, T, D): [uncond, cond]
    const sampleShape = [N, ...shape.slice(1)];
    const spec = unet.signatureFor({ sample: sampleShape, context: ctx.shape });
    const fixed = {}; // the UNet's other inputs, constant over the steps
    const zeros = {};
    for (const input of spec.inputs) {
      if (input.name === "concat") {
        if (!extra.concat) throw new BundleError("this bundle's UNet is an inpainting UNet: give an image and a mask");
        fixed.concat = { data: repeatBatch(extra.concat, k).data, shape: input.shape };
      } else if (input.name.startsWith("res_")) {
        zeros[input.name] = { data: new Float32Array(numel(input.shape)), shape: input.shape };
      }
    }
    const control = extra.hint && extra.strength !== 0 ? await this.controlResiduals(extra.hint, extra.strength, shape, N, ctx)
      : null;
    const last = this.manifest.model.config.schedule.num_train_timesteps - 1;
    const lo = (1.0 - (extra.end ?? 1)) * last, hi = (1.0 - (extra.start ?? 0)) * last;
    const unetOut = async (x, t) => {
      const xx = new Float32Array(k * x.length);
      for (let i = 0; i < k; i++) xx.set(x, i * x.length);
      const timestep = { data: new Float32Array(N).fill(t), shape: [N] };
      const xs = { data: xx, shape: sampleShape };
      const res = control && lo <= t && t <= hi ? await control(xs, timestep) : zeros;
      return (await unet.run({ sample: xs, timestep, context: ctx, ...fixed, ...res })).output;
    };
    const model = this.guided ? async (x, t) => mixGuidance(await unetOut(x, t), guidance) : unetOut;
    return sample(model, shape, section, noise, callback, extra.known ?? null);
  }

  /** (x, t) -> {res_*: {data, shape}} at `strength`: the adapter's residuals (run here, once) or the ControlNet's. */
  async controlResiduals(hint, strength, shape, N, ctx) {
    const name = this.control.component, comp = this.components[name], s = Math.fround(strength);
    const scale = (outputs, k, shapes) => {
      const out = {};
      for (const [n, v] of Object.entries(outputs)) {
        const data = new Float32Array(k * v.length);
        for (let j = 0; j < v.length; j++) data[j] = Math.fround(v[j] * s);
        for (let i = 1; i < k; i++) data.copyWithin(i * v.length, 0, v.length);
        const one = comp.outputShape(n, shapes);
        out[n] = { data, shape: [k * one[0], ...one.slice(1)] };
      }
      return out;
    };
    if (name === "adapter") {
      const h = repeatBatch(hint, shape[0]);
      const res = scale(await comp.run({ hint: h }), N / shape[0], { hint: h.shape });
      return async () => res;
    }
    const h = repeatBatch(repeatBatch(hint, shape[0]), N);
    return async (x, t) => {
      const outputs = await comp.run({ sample: x, timestep: t, context: ctx, hint: h });
      const res = {};
      for (const [n, v] of Object.entries(outputs)) {
        const data = new Float32Array(v.length);
        for (let j = 0; j < v.length; j++) data[j] = Math.fround(v[j] * s);
        res[n] = { data, shape: comp.outputShape(n, { sample: x.shape }) };
      }
      return res;
    };
  }

  /** latents (B, C, h, w) at `size` -> images Float32Array (B, H, W, 3) in [0, 1]. */
  async decode(latents, size) {
    return (await this.components.decoder.run({ latents: { data: latents, shape: this.latentShape(size) } })).image;
  }
}
