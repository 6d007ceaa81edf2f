// The Forge class and the Agent against `forge serve smollm2`: streamed tool calls, the agent's limits.
// (Chat, streams and schema output are compared with the Python client in openai.test.js; the agent's
// two-tool task is examples/agent.js, run by examples.test.js.)

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { Agent, ConfigError, Forge, tool } from "forge-llm";

import { servers } from "./servers.js";

const { smol, why } = servers();
const skip = smol ? false : why;
const app = () => new Forge({ baseURL: smol.url, apiKey: smol.apiKey, defaults: { temperature: 0 } });

const weather = tool({
  name: "get_weather",
  description: "The current weather in a city.",
  parameters: {
    type: "object",
    properties: { city: { type: "string", enum: ["Paris", "London", "Tokyo"] } },
    required: ["city"],
  },
  run: ({ city }) => `18 degrees and sunny in ${city}`,
});

describe("tool calls", { skip }, () => {
  test("a tool call comes whole, streamed or not, with arguments valid for its schema", async () => {
    const forge = app();
    const options = { tools: [weather.definition], toolChoice: "required", maxTokens: 40 };
    const messages = [{ role: "user", content: "What is the weather in Tokyo?" }];
    const plain = forge.request({ messages }, options);
    const streamed = forge.request({ messages }, options, true);
    const streaming = async () => {
      for await (const piece of forge.handleStream(streamed)) assert.equal(typeof piece, "string");
    };
    await Promise.all([forge.handle(plain), streaming()]);
    for (const ctx of [plain, streamed]) {
      assert.equal(ctx.completion.finishReason, "tool_calls");
      const [call] = ctx.completion.toolCalls;
      assert.equal(call.name, "get_weather");
      assert.ok(["Paris", "London", "Tokyo"].includes(call.arguments.city), JSON.stringify(call));
      assert.match(call.id, /^call_/);
    }
    const strip = ({ name, arguments: args }) => ({ name, arguments: args });
    assert.deepEqual(streamed.completion.toolCalls.map(strip), plain.completion.toolCalls.map(strip));
  });
});

describe("the agent's limits and failures", { skip, concurrency: true }, () => {
  test("a tool that throws becomes its result; maxIterations makes the model answer", async () => {
    const broken = tool({
      name: "get_weather",
      description: weather.description,
      parameters: weather.parameters,
      run: () => {
        throw new Error("the weather service is down");
      },
    });
    const agent = new Agent(app(), { tools: [broken], maxIterations: 1, maxTokens: 48 });
    const result = await agent.run("What is the weather in Paris?");
    const types = result.trace.map((e) => e.type).filter((t) => t !== "token");
    assert.deepEqual(types, ["tool_call", "tool_result", "final"]);
    const failed = result.trace.find((e) => e.type === "tool_result");
    assert.equal(failed.error, true);
    assert.equal(failed.content, "error: Error: the weather service is down");
    assert.equal(result.reason, "max_iterations");
    assert.equal(result.steps, 2);
    assert.ok(result.answer.length > 0);
    assert.equal(result.toolCalls[0].name, "get_weather");
    assert.equal(result.messages.at(-1).role, "assistant");
  });

  test("a spent time budget skips the tools and asks for the answer", async () => {
    let now = 0;
    const clock = () => (now += 100); // every reading is 100 s later
    const agent = new Agent(app(), { tools: [weather], timeBudget: 50, clock, maxTokens: 24 });
    const events = [];
    for await (const event of agent.stream("What is the weather in Paris?")) events.push(event);
    const final = events.at(-1);
    assert.equal(final.type, "final");
    assert.equal(final.reason, "time_budget");
    assert.ok(!events.some((e) => e.type === "tool_call"));
    assert.ok(events.some((e) => e.type === "token"));
  });
});

describe("agent definitions", () => {
  test("bad tools and options are ConfigErrors naming what is wrong", () => {
    const forge = new Forge({ baseURL: "http://127.0.0.1:9" });
    const run = () => "";
    assert.throws(
      () => new Agent(forge, { tools: [] }),
      (e) => e instanceof ConfigError && e.field === "tools",
    );
    assert.throws(() => tool({ name: "two words", run }), /tool name "two words"/);
    assert.throws(() => tool({ name: "x", run, parameters: { type: "string" } }), /object schema/);
    assert.throws(() => new Agent(forge, { tools: [tool({ name: "final_answer", run })] }), /the agent's own/);
    assert.throws(() => new Agent(forge, { tools: [weather], maxIterations: 0 }), /maxIterations = 0/);
    assert.throws(() => new Agent(forge, { tools: [weather], schema: {} }), /sets schema itself/);
    assert.throws(() => new Agent(forge, { tools: [weather], max_tokens: 9 }), /did you mean "maxTokens"/);
    assert.throws(() => new Agent({}, { tools: [weather] }), /needs a Forge app/);
  });
});
