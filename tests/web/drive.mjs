// Opens web player pages in headless Chromium (playwright-core, the system's Chromium) and runs them.
//
//     node drive.mjs < job.json > result.json
//
// job: {playwright: folder of playwright-core, chromium: executable, timeout_ms,
//       pages: [{url, runs: [mdPlayer.run options], screenshot: optional PNG path}]}
// result: {pages: [{ready_error, error_text (the page's error box), page_errors, console_errors, isolated,
//          results: [mdPlayer.run results]}]}. Console warnings are not errors; console errors are.
// Each page gets a fresh tab in one browser with a new empty profile.
import fs from "node:fs";

import { launch } from "./chromium.mjs";

const job = JSON.parse(fs.readFileSync(0, "utf8"));
const browser = await launch(job);
const context = browser.context;

async function visit(spec) {
  const out = { ready_error: null, error_text: null, page_errors: [], console_errors: [], isolated: null, results: [] };
  const page = await context.newPage();
  page.setDefaultTimeout(job.timeout_ms);
  page.on("pageerror", (e) => out.page_errors.push(String(e.stack ?? e)));
  page.on("console", (m) => {
    if (m.type() === "error") out.console_errors.push(m.text());
  });
  try {
    await page.goto(spec.url);
    // the player's API, or the error box of a player that could not load at all
    await page.waitForFunction(() => window.mdPlayer !== undefined || !document.getElementById("error").hidden);
    out.ready_error = await page.evaluate(() => (window.mdPlayer === undefined ? "the player did not load"
      : window.mdPlayer.ready.then(() => null, (e) => String(e.message ?? e))));
    out.isolated = await page.evaluate(() => self.crossOriginIsolated);
    if (out.ready_error === null) {
      for (const options of spec.runs ?? []) {
        out.results.push(await page.evaluate((o) => window.mdPlayer.run(o), options));
      }
    }
    const box = page.locator("#error");
    out.error_text = (await box.isVisible()) ? await box.textContent() : null;
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
