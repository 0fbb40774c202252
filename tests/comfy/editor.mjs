// Loads saved UI workflows into ComfyUI's graph editor (headless Chromium) and asks the editor for the
// prompt it would queue, as a user's "Queue" click does.
//
//     node editor.mjs < job.json > result.json
//
// job: {playwright: folder of playwright-core, chromium: executable, url: ComfyUI's address, timeout_ms,
//       workflows: [{name, graph: the saved workflow JSON}], screenshot: optional PNG path (the last workflow)}
// result: {page_errors, console_errors: [{during: "startup" or a workflow's name, text}], workflows: [{name,
//          unknown: [node types the editor has no definition for], dialogs: [texts of dialogs the load opened],
//          prompt: graphToPrompt().output, error}]}
import fs from "node:fs";

import { launch } from "../web/chromium.mjs";

const job = JSON.parse(fs.readFileSync(0, "utf8"));
const browser = await launch(job, { viewport: { width: 1600, height: 1000 } });
const context = browser.context;
const result = { page_errors: [], console_errors: [], workflows: [] };

async function closeDialogs(page) {
  for (let i = 0; i < 5 && (await page.locator(".p-dialog").count()) > 0; i++) {
    const close = page.locator(".p-dialog-close-button").first();
    if (await close.count()) await close.click().catch(() => {});
    else await page.keyboard.press("Escape");
    await page.waitForTimeout(200);
  }
}
try {
  const page = await context.newPage();
  page.setDefaultTimeout(job.timeout_ms);
  let during = "startup";
  page.on("pageerror", (e) => result.page_errors.push({ during, text: String(e.stack ?? e) }));
  page.on("console", (m) => {
    if (m.type() === "error") result.console_errors.push({ during, text: m.text() });
  });
  await page.goto(job.url);
  // the editor is up once the app has its graph and the node definitions from /object_info
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph
    && Object.keys(window.LiteGraph.registered_node_types ?? {}).length > 0);
  // a first start opens the templates browser for new users: close whatever the start opened
  await page.waitForTimeout(1000);
  await closeDialogs(page);
  for (const wf of job.workflows) {
    during = wf.name;
    result.workflows.push(await page.evaluate(async ({ name, graph }) => {
      const out = { name, unknown: [], dialogs: [], prompt: null, error: null };
      try {
        const known = window.LiteGraph.registered_node_types;
        out.unknown = [...new Set(graph.nodes.map((n) => n.type).filter((t) => !(t in known)))];
        await window.app.loadGraphData(structuredClone(graph), true, true, name);
        await new Promise((r) => setTimeout(r, 300)); // dialogs open after the load resolves
        out.dialogs = [...document.querySelectorAll(".p-dialog, .comfy-modal[style*='flex']")]
          .map((d) => d.innerText.trim()).filter((t) => t);
        out.prompt = (await window.app.graphToPrompt()).output;
      } catch (e) {
        out.error = String(e.stack ?? e);
      }
      return out;
    }, wf));
    await closeDialogs(page);
  }
  if (job.screenshot) await page.screenshot({ path: job.screenshot });
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(result));
