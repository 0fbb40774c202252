// Headless Chromium for the test drivers (drive.mjs: the web player; ../comfy/editor.mjs: ComfyUI's editor).
//
//     const browser = await launch(job);   // job.playwright: playwright-core's folder, job.chromium: executable
//     ... browser.context.newPage() ...
//     await browser.close();               // the context, then its throwaway profile
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";

export async function launch(job, options = {}) {
  const { chromium } = await import(pathToFileURL(path.join(job.playwright, "index.mjs")).href);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "md-chromium-")); // a new empty profile each time
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: job.chromium,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--no-first-run", "--disable-sync"],
    ...options,
  });
  return {
    context,
    async close() {
      await context.close();
      fs.rmSync(profile, { recursive: true, force: true });
    },
  };
}
