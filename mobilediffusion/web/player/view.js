// The page: the form (prompt, seed, sampler, steps, size, guidance, a strength slider per LoRA pack), the
// canvases and the messages; everything else is player.js. window.mdPlayer is the same for scripts:
//
//     await mdPlayer.ready;                       // rejects with the error the page shows
//     const r = await mdPlayer.run({prompt: "a red circle", seed: 0});
//     // r.image: base64 of the (B, H, W, 3) float32 image in [0, 1]; r.shape; r.seconds
//
// run() takes what the form does (negative, sampler, steps, guidance, size [H, W], loras {name: strength}) and
// noise: a list of base64 float32 arrays used instead of numpy_noise(seed), one per draw.
//
// A bundle with a control model shows a scribble pad (draw white strokes, or choose an edge map: it is drawn into
// the pad, which is the control image used); a bundle with an image encoder shows an image with a mask brush (paint
// what to repaint). The pads have the image size; choosing another size clears them.
import { imageSizes } from "./bundle.js";
import { centreCrop, fromRgba } from "./conditioning.js";
import { openPlayer } from "./player.js";

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

const status = (text) => { $("status").textContent = text; };

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

function injected(list) {
  let k = 0;
  return () => {
    if (k >= list.length) throw new Error(`the run draws more noise than the ${list.length} array(s) given`);
    const z = list[k++];
    return typeof z === "string" ? fromBase64(z) : Float32Array.from(z);
  };
}

// --------------------------------------------------------------------------- the form
function describe(player) {
  const m = player.manifest, s = m.sampler, img = m.image;
  const precisions = [...new Set(Object.values(m.components).map((c) => c.precision))].join("/");
  const sizes = imageSizes(m).map(([h, w]) => `${w}x${h}`).join(", ");
  const tokens = (m.tokenizer.max_length - 2) * (m.tokenizer.max_chunks ?? 1);
  $("details").textContent = `${m.model.family} model, ${sizes}, batch ${img.batch_size}, ${precisions}; prompts up ` +
    `to ${tokens} tokens; exported with ${s.name} ${s.steps} step(s)${s.guidance > 1 ? `, guidance ${s.guidance}` : ""}. ` +
    `LiteRT.js ${player.packages["@litertjs/core"]} on ${player.runtime.accelerator}` +
    `${player.runtime.threads ? " (threads)" : ""}.`;
  const samplerBox = $("sampler");
  for (const name of Object.keys(player.schedules)) samplerBox.add(new Option(name, name, false, name === s.name));
  fillSteps(player, s.steps);
  samplerBox.addEventListener("change", () => fillSteps(player, null));
  const sizeBox = $("size");
  for (const [h, w] of imageSizes(m)) sizeBox.add(new Option(`${w}x${h}`, `${w}x${h}`));
  // a field the bundle does not use is hidden and disabled: a disabled field is left out of the form's checks
  // (a hidden one is not, and a hidden guidance of 1 under its min="1.01" blocked every Generate click)
  const guided = s.guidance > 1;
  $("guidance-row").hidden = $("guidance").disabled = !guided;
  $("negative-row").hidden = $("negative").disabled = !guided;
  $("size-row").hidden = imageSizes(m).length < 2;
  $("guidance").value = s.guidance;
  for (const [name, pack] of Object.entries(player.packs)) $("loras").append(loraRow(name, pack));
  $("loras-row").hidden = Object.keys(player.packs).length === 0;
  $("control-row").hidden = !m.control;
  $("inpaint-row").hidden = !("encoder" in m.components);
  setupPads(player);
  $("generate").disabled = false;
  status("ready");
}

function loraRow(name, pack) {
  const row = document.createElement("label"), slider = document.createElement("input"), value = document.createElement("output");
  const start = String(pack.info.strength ?? 1); // what the pack is meant at (export-lora, or the graph's strength)
  Object.assign(slider, { type: "range", min: "-2", max: "2", step: "0.05", value: start });
  slider.dataset.lora = name;
  slider.setAttribute("aria-label", `${name} strength`);
  value.textContent = start;
  slider.addEventListener("input", () => { value.textContent = slider.value; });
  row.append(`${name} (${pack.name}) `, slider, " ", value);
  return row;
}

function fillSteps(player, selected) {
  const box = $("steps"), counts = Object.keys(player.schedules[$("sampler").value]).map(Number);
  box.replaceChildren(...counts.map((n) => new Option(String(n), String(n), false, n === (selected ?? counts[0]))));
}

function formSettings() {
  const [w, h] = currentSize();
  const loras = Object.fromEntries(Array.from(document.querySelectorAll("input[data-lora]"),
    (s) => [s.dataset.lora, Number(s.value)]));
  const out = { prompt: $("prompt").value, negative: $("negative").value, seed: $("seed").value.trim(),
    sampler: $("sampler").value, steps: Number($("steps").value), guidance: Number($("guidance").value),
    size: [h, w], loras };
  if (!$("control-row").hidden) {
    const hint = padImage($("scribble"));
    if (hint.data.some((v) => v > 0)) {
      Object.assign(out, { controlImage: hint, controlStrength: Number($("control-strength").value) });
    }
  }
  if (!$("inpaint-row").hidden && pictureLoaded) {
    Object.assign(out, { picture: padImage($("picture")), mask: padImage($("mask"), { alpha: true }) });
  }
  return out;
}

// --------------------------------------------------------------------------- the pads: scribble, picture, mask
let pictureLoaded = false;

function currentSize() {
  const [w, h] = ($("size").value || "").split("x").map(Number);
  return [w, h];
}

/** A pad's pixels as the image the run takes ({data (H, W, C) in [0, 1]}): RGB, or the alpha channel (the mask). */
function padImage(canvas, options) {
  const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  return fromRgba(data, canvas.height, canvas.width, options);
}

function resetPads() {
  const [w, h] = currentSize();
  for (const canvas of [$("scribble"), $("picture"), $("mask")]) {
    canvas.width = w;
    canvas.height = h;
  }
  const ctx = $("scribble").getContext("2d");
  ctx.fillStyle = "black";
  ctx.fillRect(0, 0, w, h);
  $("picture").getContext("2d").clearRect(0, 0, w, h);
  $("mask").getContext("2d").clearRect(0, 0, w, h);
  pictureLoaded = false;
}

/** Strokes with the pointer: white lines of the brush's width, in the canvas's own pixels. */
function drawable(canvas, brush, colour) {
  let last = null;
  const at = (event) => {
    const r = canvas.getBoundingClientRect();
    return [(event.clientX - r.left) * (canvas.width / r.width), (event.clientY - r.top) * (canvas.height / r.height)];
  };
  const line = (from, to) => {
    const ctx = canvas.getContext("2d");
    Object.assign(ctx, { strokeStyle: colour, lineWidth: Number($(brush).value) || 1, lineCap: "round",
      lineJoin: "round" });
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...to);
    ctx.stroke();
  };
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    last = at(e);
    line(last, last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!last) return;
    const here = at(e);
    line(last, here);
    last = here;
  });
  const end = () => { last = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

/** A chosen image file drawn into `canvas`: centre-cropped to its aspect ratio, nearest-neighbour resized. */
async function drawFile(canvas, file, background) {
  const bitmap = await createImageBitmap(file);
  const crop = centreCrop({ height: bitmap.height, width: bitmap.width, channels: 0, data: new Float32Array(0) },
    canvas.height, canvas.width);
  const x = (bitmap.width - crop.width) / 2, y = (bitmap.height - crop.height) / 2;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  if (background) {
    ctx.fillStyle = background;
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  }
  ctx.drawImage(bitmap, x, y, crop.width, crop.height, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  canvas.dataset.loaded = String(Number(canvas.dataset.loaded ?? 0) + 1); // a file was drawn (scripts wait on it)
}

function setupPads(player) {
  resetPads();
  $("size").addEventListener("change", resetPads);
  drawable($("scribble"), "scribble-brush", "white");
  drawable($("mask"), "mask-brush", "rgb(255, 0, 170)"); // the mask is its alpha; the colour only shows it
  $("control-strength").addEventListener("input", () => {
    $("control-strength-value").textContent = $("control-strength").value;
  });
  $("control-clear").addEventListener("click", () => {
    const c = $("scribble"), ctx = c.getContext("2d");
    ctx.fillStyle = "black";
    ctx.fillRect(0, 0, c.width, c.height);
  });
  $("mask-clear").addEventListener("click", () => $("mask").getContext("2d").clearRect(0, 0, $("mask").width,
    $("mask").height));
  $("picture-clear").addEventListener("click", () => {
    $("picture").getContext("2d").clearRect(0, 0, $("picture").width, $("picture").height);
    pictureLoaded = false;
  });
  const onFile = (input, canvas, background, after) => $(input).addEventListener("change", async () => {
    const file = $(input).files[0];
    if (!file) return;
    try {
      await drawFile($(canvas), file, background);
      after?.();
    } catch (error) {
      showError(new Error(`${file.name} could not be read as an image (${error.message}); choose a PNG or JPEG`));
    }
  });
  onFile("control-file", "scribble", "black");
  onFile("picture-file", "picture", null, () => { pictureLoaded = true; });
}

function show(images, [B, H, W]) {
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

// --------------------------------------------------------------------------- running
async function run(options = {}) {
  const player = await ready;
  const r = await player.run(options, status, options.noise ? injected(options.noise) : null);
  show(r.images, r.shape);
  const t = r.seconds;
  status(`done in ${t.total.toFixed(2)} s (text ${t.encode.toFixed(2)} s, ${r.steps} UNet step(s) ` +
    `${t.sample.toFixed(2)} s, decoder ${t.decode.toFixed(2)} s${t.loras > 0.005 ? `, LoRA patch ${t.loras.toFixed(2)} s` : ""})` +
    (r.notes.length ? `. ${[...new Set(r.notes)].join("; ")}` : ""));
  return { image: toBase64(r.images), shape: r.shape, seconds: t, notes: r.notes };
}

async function onGenerate(event) {
  event.preventDefault();
  $("error").hidden = true;
  $("generate").disabled = true;
  try {
    await run(formSettings());
  } catch (error) {
    showError(error);
  } finally {
    $("generate").disabled = false;
  }
}

async function load() {
  const response = await fetch(new URL("player.json", import.meta.url), { cache: "no-store" });
  if (!response.ok) {
    throw new Error(`web/player.json is missing (HTTP ${response.status}); write the player again with ` +
      "`mobilediffusion web DIR`");
  }
  const player = await openPlayer(BUNDLE, { wasm: WASM, log, status, playerJson: await response.json() });
  describe(player);
  return player;
}

const ready = load();
ready.catch(showError); // the page shows why it does not run; nothing else happens
$("form").addEventListener("submit", onGenerate);
window.mdPlayer = { ready, run };
