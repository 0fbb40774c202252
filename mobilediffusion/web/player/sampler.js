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
export async function sample(model, shape, section, noise, callback = null) {
  const size = shape.reduce((p, s) => p * s, 1);
  const draw = (what) => {
    const z = noise(shape);
    if (!(z instanceof Float32Array) || z.length !== size) {
      throw new Error(`the ${what} noise must be a Float32Array of ${size} values (shape ${JSON.stringify(shape)})`);
    }
    return z;
  };
  let x = scaled(draw("start"), section.init_noise_sigma);
  const n = section.timesteps.length;
  const d = section.d ?? new Array(n).fill(0);
  const keepX0 = "x0_p" in section;
  let x0Prev = null;
  for (let i = 0; i < n; i++) {
    const out = await model(scaled(x, section.c_in[i]), section.timesteps[i]);
    if (out.length !== size) throw new Error(`the UNet returned ${out.length} values, expected ${size}`);
    const next = mixed(x, section.a[i], out, section.b[i]);
    if (section.c[i]) addScaled(next, draw(`step ${i + 1}`), section.c[i]);
    if (d[i]) addScaled(next, x0Prev, d[i]);
    if (keepX0) x0Prev = mixed(x, section.x0_p[i], out, section.x0_q[i]);
    x = next;
    if (callback) callback(i, n, x);
  }
  return scaled(x, section.final_scale);
}
