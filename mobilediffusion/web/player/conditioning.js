// Images a run takes besides the prompt, prepared as runtime/conditioning.py prepares them with numpy: a control
// image (hint), a picture to repaint and its mask (1 = repaint). Images are {data: Float32Array (H, W, C) in [0, 1],
// height, width, channels}; every product and sum is rounded to float32 as numpy computes on float32 arrays.
import { BundleError } from "./bundle.js";

const f32 = Math.fround;

/** Python's round(): halves to even (the centre crop's offset). */
function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** RGBA bytes of a canvas (ImageData.data) -> an image of 3 channels (RGB / 255) or of the alpha alone. */
export function fromRgba(bytes, height, width, { alpha = false } = {}) {
  const channels = alpha ? 1 : 3, data = new Float32Array(height * width * channels);
  for (let p = 0; p < height * width; p++) {
    if (alpha) data[p] = f32(bytes[4 * p + 3] / 255);
    else for (let c = 0; c < 3; c++) data[3 * p + c] = f32(bytes[4 * p + c] / 255);
  }
  return { data, height, width, channels };
}

/** The centre crop of `image` to the aspect ratio of height x width (control.apply.fit_hint's crop). */
export function centreCrop(image, height, width) {
  const { height: h, width: w, channels: C } = image;
  const old = w / h, fresh = width / height;
  let x = 0, y = 0;
  if (old > fresh) x = roundHalfEven((w - w * (fresh / old)) / 2);
  else if (old < fresh) y = roundHalfEven((h - h * (old / fresh)) / 2);
  if (!x && !y) return image;
  const H = h - 2 * y, W = w - 2 * x, data = new Float32Array(H * W * C);
  for (let i = 0; i < H; i++) data.set(image.data.subarray(((i + y) * w + x) * C, ((i + y) * w + x + W) * C), i * W * C);
  return { data, height: H, width: W, channels: C };
}

function nearestIndex(nIn, nOut, exact) {
  const scale = f32(nIn / nOut), out = new Int32Array(nOut);
  for (let i = 0; i < nOut; i++) out[i] = Math.min(Math.floor(exact ? f32(f32(i + 0.5) * scale) : f32(i * scale)), nIn - 1);
  return out;
}

/** torch's "nearest-exact" resize (or "nearest" with exact = false). */
export function resizeNearest(image, height, width, exact = true) {
  const { height: h, width: w, channels: C } = image;
  if (h === height && w === width) return image;
  const ys = nearestIndex(h, height, exact), xs = nearestIndex(w, width, exact), data = new Float32Array(height * width * C);
  for (let i = 0; i < height; i++) {
    for (let j = 0; j < width; j++) {
      for (let c = 0; c < C; c++) data[(i * width + j) * C + c] = image.data[(ys[i] * w + xs[j]) * C + c];
    }
  }
  return { data, height, width, channels: C };
}

function bilinearWeights(nIn, nOut) {
  const scale = f32(nIn / nOut), i0 = new Int32Array(nOut), i1 = new Int32Array(nOut), lam = new Float32Array(nOut);
  for (let i = 0; i < nOut; i++) {
    const src = Math.max(f32(f32(f32(i + 0.5) * scale) - 0.5), 0);
    i0[i] = Math.min(Math.floor(src), nIn - 1);
    i1[i] = Math.min(i0[i] + 1, nIn - 1);
    lam[i] = f32(src - i0[i]);
  }
  return [i0, i1, lam];
}

/** torch's "bilinear" resize, align_corners = false, no antialiasing (runtime/conditioning.py resize_bilinear). */
export function resizeBilinear(image, height, width) {
  const { height: h, width: w, channels: C, data: a } = image;
  const [y0, y1, ly] = bilinearWeights(h, height), [x0, x1, lx] = bilinearWeights(w, width);
  const data = new Float32Array(height * width * C);
  const at = (y, x, c) => a[(y * w + x) * C + c];
  for (let i = 0; i < height; i++) {
    for (let j = 0; j < width; j++) {
      const one = f32(1 - lx[j]), oy = f32(1 - ly[i]);
      for (let c = 0; c < C; c++) {
        const top = f32(f32(at(y0[i], x0[j], c) * one) + f32(at(y0[i], x1[j], c) * lx[j]));
        const bottom = f32(f32(at(y1[i], x0[j], c) * one) + f32(at(y1[i], x1[j], c) * lx[j]));
        data[(i * width + j) * C + c] = f32(f32(top * oy) + f32(bottom * ly[i]));
      }
    }
  }
  return { data, height, width, channels: C };
}

/** fit_hint: centre crop to the aspect ratio, then nearest-exact. */
export const fit = (image, height, width) => resizeNearest(centreCrop(image, height, width), height, width);

/** The image with `want` channels: the channels' mean for 1, the grey channel repeated for 3. */
export function withChannels(image, want) {
  const { data, height, width, channels: C } = image;
  if (C === want) return image;
  const n = height * width, out = new Float32Array(n * want);
  for (let p = 0; p < n; p++) {
    if (want === 1) {
      let s = 0;
      for (let c = 0; c < C; c++) s = f32(s + data[p * C + c]);
      out[p] = f32(s / C);
    } else {
      for (let c = 0; c < want; c++) out[p * want + c] = C === 1 ? data[p] : data[p * C + c];
    }
  }
  return { data: out, height, width, channels: want };
}

/** (H, W, C) -> {data, shape: [1, C, H, W]} (NCHW). */
function toNchw({ data, height, width, channels: C }) {
  const out = new Float32Array(data.length);
  for (let p = 0; p < height * width; p++) for (let c = 0; c < C; c++) out[c * height * width + p] = data[p * C + c];
  return { data: out, shape: [1, C, height, width] };
}

/** A control image -> the hint {data, shape [1, channels, H, W]} (prepare_hint). */
export function prepareHint(image, height, width, channels) {
  return toNchw(withChannels(fit(image, height, width), channels));
}

/**
 * The picture and mask of an inpainting run (prepare_known): {image: {data, shape [1, H, W, 3]}, mask: {data, shape
 * [1, 1, h, w]}} for an ordinary UNet (the noise mask), or {image, hardMask, maskedImage} for an inpainting UNet.
 */
export function prepareKnown(picture, mask, height, width, [h, w], inpaintingUnet) {
  if (!picture) throw new BundleError("a mask needs an image to repaint: choose an image");
  if (!mask) throw new BundleError("paint the mask (white = repaint) over the image");
  const rgb = withChannels(fit(picture, height, width), 3);
  const m = fit(withChannels(mask, 1), height, width);
  let max = 0, min = 1;
  for (let i = 0; i < m.data.length; i++) {
    m.data[i] = Math.min(Math.max(m.data[i], 0), 1);
    max = Math.max(max, m.data[i]);
    min = Math.min(min, m.data[i]);
  }
  if (max < 0.5) throw new BundleError("the mask is empty: nothing to repaint; paint over what to repaint");
  if (min >= 0.5 && !inpaintingUnet) {
    throw new BundleError("the mask covers the whole image: that is text-to-image; clear the image and mask");
  }
  const image = { data: rgb.data, shape: [1, height, width, 3] };
  if (!inpaintingUnet) {
    const small = resizeBilinear(m, h, w);
    return { image, mask: { data: small.data, shape: [1, 1, h, w] } };
  }
  const hard = { ...m, data: m.data.map((v) => (v >= 0.5 ? 1 : 0)) };
  const masked = new Float32Array(rgb.data.length);
  for (let p = 0; p < height * width; p++) {
    const k = hard.data[p];
    for (let c = 0; c < 3; c++) masked[3 * p + c] = f32(f32(rgb.data[3 * p + c] * f32(1 - k)) + f32(0.5 * k));
  }
  const small = resizeNearest(hard, h, w, false);
  return { image, hardMask: { data: small.data, shape: [1, 1, h, w] }, maskedImage: { data: masked,
    shape: [1, height, width, 3] } };
}
