// Uses web player pages in headless Chromium as a person does: types the prompt, picks the settings, clicks
// Generate and reads the pictures off the page's canvases.
//
//     node drive.mjs < job.json > result.json
//
// job: {playwright: folder of playwright-core, chromium: executable, timeout_ms,
//       pages: [{url, runs: [run], screenshot: optional PNG path}]}
// run: the fields a user sets, each optional (left as the page shows it when absent): {prompt, negative, seed,
//      sampler, steps, guidance, size ("WxH"), loras: {pack name: strength}, control_file (an image file chosen for
//      the control pad), clear_scribble, scribble: [[[x, y], ...] per stroke, image pixels] (dragged on the pad),
//      scribble_brush, control_strength, picture_file, clear_picture, mask_brush, clear_mask, mask: strokes}
// result: {pages: [{ready_error (the page's error box once loading ended, or null), page_errors, console_errors,
//          isolated, controls: {id or "lora:NAME": {hidden, disabled, options, value}} as loaded, results: [{images: [base64 RGB
//          bytes per canvas], shape [B, H, W, 3], status, error_text, pads: {scribble, picture (base64 RGB bytes),
//          mask (base64 alpha bytes), width, height} as the run used them}]}]}
// Console warnings are not errors; console errors are. Each page gets a fresh tab in one browser with a new
// empty profile. A click that starts nothing (the form refused to submit) is reported as a run whose status did
// not change, after `idle_ms`.
import fs from "node:fs";

import { launch } from "./chromium.mjs";

const job = JSON.parse(fs.readFileSync(0, "utf8"));
const browser = await launch(job);
const context = browser.context;
const CONTROLS = ["prompt", "negative", "seed", "sampler", "steps", "guidance", "size", "generate", "scribble",
  "picture", "control-strength"];

/** Waits until the page is ready (Generate enabled) or shows an error; returns the error text or null. */
async function loaded(page) {
  await page.waitForFunction(() => !document.getElementById("generate").disabled ||
    !document.getElementById("error").hidden);
  const box = page.locator("#error");
  return (await box.isVisible()) ? await box.textContent() : null;
}

async function controls(page) {
  return page.evaluate((ids) => {
    const describe = (el) => {
      const row = el.closest(".row");
      return { hidden: Boolean(row?.hidden) || el.hidden, disabled: el.disabled,
        options: el.options ? Array.from(el.options, (o) => o.value) : null, value: el.value };
    };
    const found = ids.map((id) => [id, document.getElementById(id) && describe(document.getElementById(id))]);
    const sliders = Array.from(document.querySelectorAll("input[type=range][data-lora]"),
      (el) => [`lora:${el.dataset.lora}`, describe(el)]);
    return Object.fromEntries([...found, ...sliders]);
  }, CONTROLS);
}

/** Drags the mouse along each stroke (image pixels of the canvas `id`), as a person draws. */
async function draw(page, id, strokes) {
  for (const stroke of strokes) {
    const box = await page.locator(`#${id}`).boundingBox();
    const size = await page.evaluate((i) => [document.getElementById(i).width, document.getElementById(i).height], id);
    const to = ([x, y]) => [box.x + (x + 0.5) * (box.width / size[0]), box.y + (y + 0.5) * (box.height / size[1])];
    await page.mouse.move(...to(stroke[0]));
    await page.mouse.down();
    for (const point of stroke.slice(1)) await page.mouse.move(...to(point), { steps: 4 });
    await page.mouse.up();
  }
}

/** Chooses `file` in the file input `input` and waits until the page has drawn it into the canvas `canvas`. */
async function choose(page, input, canvas, file) {
  const before = await page.evaluate((c) => document.getElementById(c).dataset.loaded ?? "0", canvas);
  await page.locator(`#${input}`).setInputFiles(file);
  await page.waitForFunction(([c, b]) => (document.getElementById(c).dataset.loaded ?? "0") !== b, [canvas, before]);
}

/** The pads' pixels (what the run used): RGB of the scribble pad and the picture, alpha of the mask. */
async function pads(page) {
  return page.evaluate(() => {
    const read = (id, alpha) => {
      const c = document.getElementById(id);
      if (c.closest(".row").hidden) return null;
      const { data } = c.getContext("2d").getImageData(0, 0, c.width, c.height);
      const n = c.width * c.height, out = new Uint8Array(alpha ? n : 3 * n);
      for (let p = 0; p < n; p++) {
        if (alpha) out[p] = data[4 * p + 3];
        else out.set(data.subarray(4 * p, 4 * p + 3), 3 * p);
      }
      let text = "";
      for (let i = 0; i < out.length; i += 0x8000) text += String.fromCharCode(...out.subarray(i, i + 0x8000));
      return btoa(text);
    };
    const c = document.getElementById("scribble");
    return { scribble: read("scribble"), picture: read("picture"), mask: read("mask", true), width: c.width,
      height: c.height };
  });
}

/** The user's settings into the form, then a click on Generate; the pictures once the run ended. */
async function generate(page, run) {
  for (const id of ["prompt", "negative", "seed", "guidance"]) {
    if (run[id] !== undefined) await page.locator(`#${id}`).fill(String(run[id]));
  }
  if (run.sampler !== undefined) await page.locator("#sampler").selectOption(String(run.sampler));
  if (run.steps !== undefined) await page.locator("#steps").selectOption(String(run.steps));
  if (run.size !== undefined) await page.locator("#size").selectOption(String(run.size));
  for (const [name, strength] of Object.entries(run.loras ?? {})) {
    const slider = page.locator(`input[type=range][data-lora="${name}"]`);
    await slider.fill(String(strength));
  }
  if (run.control_file) await choose(page, "control-file", "scribble", run.control_file);
  if (run.clear_scribble) await page.locator("#control-clear").click();
  if (run.scribble_brush !== undefined) await page.locator("#scribble-brush").fill(String(run.scribble_brush));
  await draw(page, "scribble", run.scribble ?? []);
  if (run.control_strength !== undefined) await page.locator("#control-strength").fill(String(run.control_strength));
  if (run.picture_file) await choose(page, "picture-file", "picture", run.picture_file);
  if (run.clear_picture) await page.locator("#picture-clear").click();
  if (run.clear_mask) await page.locator("#mask-clear").click();
  if (run.mask_brush !== undefined) await page.locator("#mask-brush").fill(String(run.mask_brush));
  await draw(page, "mask", run.mask ?? []);
  // what the last run left on the page is cleared, so that only this click's run can end the wait
  const before = await page.evaluate(() => {
    const status = document.getElementById("status"), text = status.textContent;
    status.textContent = "";
    document.getElementById("error").hidden = true;
    return text;
  });
  await page.locator("#generate").click();
  // a run disables Generate and then ends with "done ..." or the error box; a refused submit changes nothing
  const ended = await page.waitForFunction(() => {
    const status = document.getElementById("status").textContent;
    return status.startsWith("done") || !document.getElementById("error").hidden;
  }, null, { timeout: job.idle_ms ?? job.timeout_ms }).then(() => true, () => false);
  const status = await page.locator("#status").textContent();
  const box = page.locator("#error");
  const out = { status: ended ? status : `nothing happened after the click (status stayed ${JSON.stringify(before)})`,
    error_text: (await box.isVisible()) ? await box.textContent() : null, images: [], shape: null,
    pads: await pads(page) };
  if (!ended || out.error_text !== null) return out;
  const pictures = await page.evaluate(() => Array.from(document.querySelectorAll("#images canvas"), (c) => {
    const { data } = c.getContext("2d").getImageData(0, 0, c.width, c.height);
    const rgb = new Uint8Array(c.width * c.height * 3);
    for (let p = 0; p < c.width * c.height; p++) rgb.set(data.subarray(4 * p, 4 * p + 3), 3 * p);
    let text = "";
    for (let i = 0; i < rgb.length; i += 0x8000) text += String.fromCharCode(...rgb.subarray(i, i + 0x8000));
    return { image: btoa(text), width: c.width, height: c.height };
  }));
  out.images = pictures.map((p) => p.image);
  if (pictures.length) out.shape = [pictures.length, pictures[0].height, pictures[0].width, 3];
  return out;
}

async function visit(spec) {
  const out = { ready_error: null, page_errors: [], console_errors: [], isolated: null, controls: null, results: [] };
  const page = await context.newPage();
  page.setDefaultTimeout(job.timeout_ms);
  page.on("pageerror", (e) => out.page_errors.push(String(e.stack ?? e)));
  page.on("console", (m) => {
    if (m.type() === "error") out.console_errors.push(m.text());
  });
  try {
    await page.goto(spec.url);
    out.ready_error = await loaded(page);
    out.isolated = await page.evaluate(() => self.crossOriginIsolated);
    out.controls = await controls(page);
    if (out.ready_error === null) {
      for (const run of spec.runs ?? []) out.results.push(await generate(page, run));
    }
    if (spec.screenshot) await page.screenshot({ path: spec.screenshot, fullPage: true });
  } finally {
    await page.close();
  }
  return out;
}

const result = { pages: [] };
try {
  for (const spec of job.pages) result.pages.push(await visit(spec));
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(result));
