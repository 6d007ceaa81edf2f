// Drive a page in headless Chromium (playwright-core, /usr/bin/chromium) and print what it computed as JSON.
//
//   node browser.mjs < job.json
//
// job: { url, steps: [...], timeout_ms, chromium, webgpu } (webgpu: false leaves out --enable-unsafe-webgpu). Each step is one of
//   { evaluate: "async (arg) => ...", arg }   run in the page once window.forgeReady resolved; its value is returned
//   { chat: "a prompt", screenshot: "/path.png" } type into the chat page, press Enter, record the reply at each change as it
//                                               streams, screenshot it when done
// Output: { results: [...], console: [...] } on stdout; a failure prints { error, console } and exits 1.

import { chromium } from "playwright-core";

const ARGS = ["--headless=new", "--no-sandbox"];

async function readJob() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString("utf-8"));
}

/** Type `prompt` into the chat page and watch the reply grow; returns its text at each change and at the end.
 *  A MutationObserver in the page records every change as it happens (observer callbacks run as microtasks between
 *  the page's own steps), so the count of samples does not depend on how fast this process polls. */
async function chat(page, prompt, screenshot) {
  await page.evaluate(() => {
    window.forgeSamples = [];
    const record = () => {
      const reply = [...document.querySelectorAll(".msg.assistant")].at(-1);
      if (reply && window.forgeSamples.at(-1) !== reply.textContent) window.forgeSamples.push(reply.textContent);
    };
    new MutationObserver(record).observe(document.body, { subtree: true, childList: true, characterData: true });
  });
  await page.fill("#prompt", prompt);
  await page.press("#prompt", "Enter");
  const reply = page.locator(".msg.assistant").last();
  await reply.waitFor();
  await page.waitForFunction(() => [...document.querySelectorAll(".msg.assistant")].at(-1)?.dataset.done === "true");
  const final = await reply.textContent();
  const seen = (await page.evaluate(() => window.forgeSamples)).filter((text) => text !== "");
  if (seen.at(-1) !== final) seen.push(final);
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  const status = await page.locator("#status").textContent();
  return { samples: seen, reply: final, status };
}

async function main() {
  const job = await readJob();
  const args = job.webgpu === false ? ARGS : [...ARGS, "--enable-unsafe-webgpu"];
  const browser = await chromium.launch({ executablePath: job.chromium ?? "/usr/bin/chromium", args });
  const logs = [];
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(job.timeout_ms ?? 600_000);
    page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
    // An uncaught error while the page loads (a syntax error in a module, say) means forgeReady never comes: fail
    // at once with that error rather than after the whole timeout.
    let threw;
    const thrown = new Promise((_, reject) => (threw = reject));
    thrown.catch(() => {});
    page.on("pageerror", (e) => {
      logs.push(`pageerror: ${e.message}`);
      threw(new Error(`the page threw while loading: ${e.message}`));
    });
    await page.goto(job.url);
    await Promise.race([page.waitForFunction(() => window.forgeReady !== undefined), thrown]);
    await Promise.race([page.evaluate(() => window.forgeReady), thrown]);
    const results = [];
    for (const step of job.steps) {
      if (step.chat !== undefined) {
        results.push(await chat(page, step.chat, step.screenshot));
      } else {
        results.push(await page.evaluate(`(${step.evaluate})(${JSON.stringify(step.arg ?? null)})`));
      }
    }
    process.stdout.write(JSON.stringify({ results, console: logs }));
  } catch (error) {
    process.stdout.write(JSON.stringify({ error: String(error?.stack ?? error), console: logs }));
    process.exitCode = 1;
  } finally {
    await browser.close();
  }
}

await main();
