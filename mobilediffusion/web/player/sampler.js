// The sampler loop of runtime/sampler.py on Float32Arrays, from the per-step coefficients of a manifest
// sampler section (any of the six samplers: the section's lists carry what differs between them):
//
//     x = noise * init_noise_sigma
//     for i in range(N):
//         out = model(c_in[i] * x, timesteps[i])
//         x0 = x0_p[i] * x + x0_q[i] * out                      (kept for the next step: DPM-Solver++ 2M)
//         x = a[i] * x + b[i] * out + c[i] * noise_i + d[i] * x0_prev
//     latents = final_scale * x
//
// Every product and sum is rounded to float32 as numpy does on float32 arrays, so the page follows the
// Python runtime operation for operation.
//
// Keeping a known region (known = {latents, mask} with mask 1 = repaint, broadcast over batch and channels): the run
// starts at L + sigma_start z, the model sees x m + (L + sigma_i z)(1 - m), and the step runs on the output whose
// x0 estimate (x0_p x + x0_q out) is L outside the mask (runtime/sampler.py).

export const SAMPLERS = ["onestep", "ddim", "euler", "euler_ancestral", "lcm", "dpmpp_2m"];

const f32 = Math.fround;

function scaled(x, s) {
  const k = f32(s), out = new Float32Array(x.length);
  for (let j = 0; j < x.length; j++) out[j] = x[j] * k;
  return out;
}

function mixed(x, a, y, b) { // a * x + b * y, each product rounded first (numpy: x * a + y * b)
  const ka = f32(a), kb = f32(b), out = new Float32Array(x.length);
  for (let j = 0; j < x.length; j++) out[j] = f32(x[j] * ka) + f32(y[j] * kb);
  return out;
}

function addScaled(acc, y, b) { // acc += y * b
  const kb = f32(b);
  for (let j = 0; j < acc.length; j++) acc[j] = acc[j] + f32(y[j] * kb);
}

/**
 * model(x: Float32Array, t: number) -> Promise<Float32Array>; shape [B, C, h, w]; section: the manifest's
 * sampler section; noise(shape) -> Float32Array (drawn in the runtime's order). Returns the latents.
 */
export async function sample(model, shape, section, noise, callback = null, known = null) {
  const size = shape.reduce((p, s) => p * s, 1);
  const draw = (what) => {
    const z = noise(shape);
    if (!(z instanceof Float32Array) || z.length !== size) {
      throw new Error(`the ${what} noise must be a Float32Array of ${size} values (shape ${JSON.stringify(shape)})`);
    }
    return z;
  };
  const z = draw("start");
  const n = section.timesteps.length;
  let x, L = null, m = null;
  if (known) {
    if (!section.sigmas) throw new Error("keeping a known region needs the section's sigmas: re-export the bundle");
    L = known.latents;
    const [B, C, h, w] = shape, plane = h * w, per = known.mask.length / plane; // the mask: 1 or B planes
    m = new Float32Array(size);
    for (let b = 0; b < B; b++) {
      for (let c = 0; c < C; c++) m.set(known.mask.subarray((per === 1 ? 0 : b) * plane, (per === 1 ? 1 : b + 1) * plane), (b * C + c) * plane);
    }
    x = mixed(L, 1, z, section.sigma_start);
  } else {
    x = scaled(z, section.init_noise_sigma);
  }
  const d = section.d ?? new Array(n).fill(0);
  const keepX0 = "x0_p" in section;
  let x0Prev = null;
  for (let i = 0; i < n; i++) {
    let seen = x;
    if (known) { // x m + (L + z sigma_i)(1 - m), float32 at each operation as numpy
      const s = f32(section.sigmas[i]);
      seen = new Float32Array(size);
      for (let j = 0; j < size; j++) {
        seen[j] = f32(x[j] * m[j]) + f32(f32(L[j] + f32(z[j] * s)) * f32(1 - m[j]));
      }
    }
    let out = await model(scaled(seen, section.c_in[i]), section.timesteps[i]);
    if (out.length !== size) throw new Error(`the UNet returned ${out.length} values, expected ${size}`);
    if (known) { // the output whose x0 estimate, read at x, is the blended one
      const p = f32(section.x0_p[i]), q = f32(section.x0_q[i]), eff = new Float32Array(size);
      for (let j = 0; j < size; j++) {
        const x0 = f32(f32(f32(f32(seen[j] * p) + f32(out[j] * q)) * m[j]) + f32(L[j] * f32(1 - m[j])));
        eff[j] = f32(f32(x0 - f32(x[j] * p)) / q);
      }
      out = eff;
    }
    const next = mixed(x, section.a[i], out, section.b[i]);
    if (section.c[i]) addScaled(next, draw(`step ${i + 1}`), section.c[i]);
    if (d[i]) addScaled(next, x0Prev, d[i]);
    if (keepX0) x0Prev = mixed(x, section.x0_p[i], out, section.x0_q[i]);
    x = next;
    if (callback) callback(i, n, x);
  }
  return scaled(x, section.final_scale);
}

/**
 * Classifier-free guidance on the UNet's [uncond, cond] output (2N values): u + g * (c - u), float32 at each
 * operation as numpy computes it (runtime/pipeline.py).
 */
export function mixGuidance(out, guidance) {
  const n = out.length / 2, g = f32(guidance), mixed = new Float32Array(n);
  for (let j = 0; j < n; j++) {
    const u = out[j];
    mixed[j] = u + f32(g * f32(out[n + j] - u));
  }
  return mixed;
}

const gcd = (a, b) => (b ? gcd(b, a % b) : a);

/**
 * Contexts {data, shape: [b, T, D]} -> one {data, shape: [sum b, T', D]}, each repeated along T to the least common
 * multiple of their lengths (attention over a repeated context equals attention over it once; runtime/pipeline.py
 * batch_contexts).
 */
export function batchContexts(contexts) {
  const T = contexts.reduce((l, c) => (l * c.shape[1]) / gcd(l, c.shape[1]), 1);
  const D = contexts[0].shape[2], B = contexts.reduce((n, c) => n + c.shape[0], 0);
  const out = new Float32Array(B * T * D);
  let row = 0;
  for (const { data, shape: [b, t] } of contexts) {
    for (let i = 0; i < b; i++, row++) {
      const one = data.subarray(i * t * D, (i + 1) * t * D);
      for (let k = 0; k < T / t; k++) out.set(one, (row * T + k * t) * D);
    }
  }
  return { data: out, shape: [B, T, D] };
}
