// Every example in examples/, run as a user runs it (FORGE_BASE_URL, FORGE_API_KEY) against a real server.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { describe, test } from "node:test";

import { Forge } from "forge-llm";

import { JS_ROOT, servers } from "./servers.js";

const { tiny, smol, why } = servers();

/** Run an example to its end against `server`; its exit code and output. */
async function example(name, server, args = []) {
  const env = { ...process.env, FORGE_BASE_URL: server.url, FORGE_API_KEY: server.apiKey };
  const child = spawn(process.execPath, [join(JS_ROOT, "examples", name), ...args], { env });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (d) => (stdout += d));
  child.stderr.on("data", (d) => (stderr += d));
  const [code] = await once(child, "exit");
  assert.equal(code, 0, `${name} failed:\n${stdout}\n${stderr}`);
  return { stdout, stderr };
}

describe("examples against SmolLM2", { skip: smol ? false : why, concurrency: true }, () => {
  test("quickstart.js generates, streams the same text, and chats", async () => {
    const { stdout, stderr } = await example("quickstart.js", smol);
    const generated = JSON.parse(stdout.match(/^generate: (.*)$/m)[1]);
    const streamed = JSON.parse(stdout.match(/^stream: +(".*") in \d+ pieces$/m)[1]);
    assert.equal(streamed, generated);
    assert.match(stdout, /^chat: +".*Paris.*"$/m);
    assert.match(stdout, /\[24 tokens, length, [\d.]+ s\]/);
    assert.equal(stderr.match(/^req-\w+ /gm)?.length, 3, stderr); // logger(): a line per request
  });

  test("agent.js completes its two-tool task: a lookup, then the calculator, then the answer", async () => {
    const { stdout } = await example("agent.js", smol);
    const calls = stdout.match(/^call +.*$/gm) ?? [];
    assert.ok(calls.includes('call   lookup({"topic":"Eiffel Tower"})'), stdout);
    assert.ok(
      calls.some((c) => c.startsWith("call   calculator(")),
      stdout,
    );
    assert.match(stdout, /^result 330 \* 3\.28 = 1082\.4$/m);
    assert.match(stdout, /^answer .*1082\.4/m);
    assert.match(stdout, /^done +after \d+ steps \((answer|max_iterations)\)$/m);
  });
});

describe("examples against the tiny model", { skip: tiny ? false : why }, () => {
  test("rag.js searches the store and answers with its sources", async () => {
    const { stdout } = await example("rag.js", tiny, ["When is the launch?"]);
    const hits = stdout.match(/^ {2}[\d.]+ {2}.*$/gm);
    assert.equal(hits.length, 2);
    assert.match(hits[0], /launch\.md: The Apollo-X launch is scheduled for March 14/);
    assert.match(stdout, /^answer: .+$/m);
    assert.match(stdout, /^ {2}\[1\] .*launch\.md$/m);
  });

  test("server.js relays a Forge stream to the browser as server-sent events", async () => {
    const env = { ...process.env, FORGE_BASE_URL: tiny.url, FORGE_API_KEY: tiny.apiKey, PORT: "0" };
    const child = spawn(process.execPath, [join(JS_ROOT, "examples", "server.js")], { env });
    try {
      const lines = createInterface({ input: child.stdout });
      const [line] = await once(lines, "line");
      const base = line.match(/listening on (http:\S+)/)[1];
      assert.match(await (await fetch(base)).text(), /new EventSource\("\/generate/);
      const response = await fetch(`${base}generate?prompt=${encodeURIComponent("To be")}`);
      assert.equal(response.headers.get("content-type"), "text/event-stream");
      const body = await response.text();
      const pieces = [...body.matchAll(/^data: (\{.*\})$/gm)].map((m) => JSON.parse(m[1]).text).filter((t) => t);
      assert.match(body, /event: done\n/);
      const options = { maxTokens: 48, temperature: 0 }; // the example's
      const direct = await new Forge({ baseURL: tiny.url, apiKey: tiny.apiKey }).generate("To be", options);
      assert.equal(pieces.join(""), direct);
    } finally {
      child.kill("SIGTERM");
    }
  });
});
