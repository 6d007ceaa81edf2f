// The official openai npm client, this package and the Python openai client, against the same `forge serve`:
// the same requests (plain, stream, tools, response_format) give the same greedy outputs.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { join } from "node:path";
import { describe, test } from "node:test";

import OpenAI from "openai";

import { Forge } from "forge-llm";

import { JS_ROOT, servers } from "./servers.js";

const { tiny, smol, python, why } = servers();

const WEATHER = {
  type: "function",
  function: {
    name: "get_weather",
    description: "The current weather in a city.",
    parameters: {
      type: "object",
      properties: {
        city: { type: "string", enum: ["Paris", "London", "Tokyo"] },
        unit: { type: "string", enum: ["celsius", "fahrenheit"] },
      },
      required: ["city", "unit"],
    },
  },
};
const CITY = {
  type: "object",
  properties: { city: { type: "string", maxLength: 20 }, country: { type: "string", maxLength: 20 } },
  required: ["city", "country"],
  additionalProperties: false,
};
const user = (content) => [{ role: "user", content }];

/** The requests, in the HTTP API's names. */
const REQUESTS = {
  plain: { route: "completions", body: { prompt: "The capital of France is", max_tokens: 12, temperature: 0 } },
  stream: {
    route: "chat",
    body: { messages: user("Name three colours."), max_tokens: 16, temperature: 0, stream: true },
  },
  tools: {
    route: "chat",
    body: {
      messages: user("What is the weather in Paris, in celsius?"),
      tools: [WEATHER],
      tool_choice: "required",
      max_tokens: 48,
      temperature: 0,
    },
  },
  response_format: {
    route: "chat",
    body: {
      messages: user("Name a city and its country."),
      response_format: { type: "json_schema", json_schema: { name: "city", schema: CITY } },
      max_tokens: 40,
      temperature: 0,
    },
  },
};

/** The Python openai client's answers (test/openai_client.py). */
async function pythonAnswers(server, requests) {
  const child = spawn(python, [join(JS_ROOT, "test", "openai_client.py")]);
  let out = "";
  let err = "";
  child.stdout.on("data", (d) => (out += d));
  child.stderr.on("data", (d) => (err += d));
  child.stdin.end(JSON.stringify({ base_url: server.url, api_key: server.apiKey, requests }));
  const [code] = await once(child, "exit");
  assert.equal(code, 0, err);
  return JSON.parse(out);
}

/** The official openai npm client's answer, in the same shape. */
async function jsAnswer(client, { route, body }) {
  if (route === "completions") {
    const reply = await client.completions.create(body);
    return { text: reply.choices[0].text, tool_calls: [], finish_reason: reply.choices[0].finish_reason };
  }
  if (!body.stream) {
    const { message, finish_reason } = (await client.chat.completions.create(body)).choices[0];
    const calls = (message.tool_calls ?? []).map((c) => ({
      name: c.function.name,
      arguments: JSON.parse(c.function.arguments),
    }));
    return { text: message.content ?? "", tool_calls: calls, finish_reason };
  }
  let text = "";
  let finish = null;
  for await (const chunk of await client.chat.completions.create(body)) {
    text += chunk.choices[0]?.delta?.content ?? "";
    finish = chunk.choices[0]?.finish_reason ?? finish;
  }
  return { text, tool_calls: [], finish_reason: finish };
}

/** The same requests through Forge, in the same shape. */
async function forgeAnswers(app) {
  const plain = app.request({ prompt: "The capital of France is" }, { maxTokens: 12, temperature: 0 });
  const stream = app.request({ messages: user("Name three colours.") }, { maxTokens: 16, temperature: 0 }, true);
  const tools = app.request(
    { messages: user("What is the weather in Paris, in celsius?") },
    { tools: [WEATHER], toolChoice: "required", maxTokens: 48, temperature: 0 },
  );
  const streamed = async () => {
    let text = "";
    for await (const piece of app.handleStream(stream)) text += piece;
    return text;
  };
  const [a, b, c, parsed] = await Promise.all([
    app.handle(plain),
    streamed(),
    app.handle(tools),
    // With a schema, generate() sends its prompt as one user message: the same request as response_format's.
    app.generate("Name a city and its country.", { schema: CITY, maxTokens: 40, temperature: 0 }),
  ]);
  return { plain: [a, plain], stream: [b, stream], tools: [c, tools], response_format: [JSON.stringify(parsed)] };
}

describe("the same greedy outputs from every client", () => {
  test("on SmolLM2: plain, stream, tools and response_format", { skip: smol ? false : why }, async () => {
    const names = Object.keys(REQUESTS);
    const client = new OpenAI({ baseURL: `${smol.url}/v1`, apiKey: smol.apiKey, maxRetries: 0 });
    const [model] = await new Forge({ baseURL: smol.url, apiKey: smol.apiKey }).models();
    const requests = names.map((n) => ({ ...REQUESTS[n], body: { model, ...REQUESTS[n].body } }));
    // All at once: the server decodes them together, and batching must not change a greedy output.
    const [py, js, forge] = await Promise.all([
      pythonAnswers(smol, requests),
      Promise.all(requests.map((r) => jsAnswer(client, r))),
      forgeAnswers(new Forge({ baseURL: smol.url, apiKey: smol.apiKey })),
    ]);
    names.forEach((name, i) => {
      assert.deepEqual(js[i], py[i], `${name}: the npm client and the Python client differ`);
      if (name === "response_format") {
        assert.deepEqual(JSON.parse(forge[name][0]), JSON.parse(py[i].text));
        return;
      }
      const [text, ctx] = forge[name];
      assert.equal(text, py[i].text, `${name}: Forge and the Python client differ`);
      assert.equal(ctx.completion.finishReason, py[i].finish_reason, name);
      const calls = ctx.completion.toolCalls.map(({ name, arguments: args }) => ({ name, arguments: args }));
      assert.deepEqual(calls, py[i].tool_calls, name);
    });
    assert.equal(py[2].finish_reason, "tool_calls");
    assert.equal(py[2].tool_calls[0].name, "get_weather");
    assert.deepEqual(Object.keys(JSON.parse(py[3].text)).sort(), ["city", "country"]);
    assert.ok(py[0].text.length && py[1].text.length);
  });

  test("on the tiny model: seeded sampling, plain and streamed", { skip: tiny ? false : why }, async () => {
    const [model] = await new Forge({ baseURL: tiny.url, apiKey: tiny.apiKey }).models();
    const body = { model, prompt: "To be", max_tokens: 20, temperature: 1, seed: 7 };
    const requests = [
      { route: "completions", body },
      { route: "completions", body: { ...body, stream: true } },
    ];
    const py = await pythonAnswers(tiny, requests);
    const client = new OpenAI({ baseURL: `${tiny.url}/v1`, apiKey: tiny.apiKey, maxRetries: 0 });
    assert.deepEqual(await jsAnswer(client, requests[0]), py[0]);
    const app = new Forge({ baseURL: tiny.url, apiKey: tiny.apiKey });
    let streamed = "";
    for await (const piece of app.stream("To be", { maxTokens: 20, temperature: 1, seed: 7 })) streamed += piece;
    assert.equal(streamed, py[1].text);
    assert.equal(py[0].text, py[1].text);
  });
});
