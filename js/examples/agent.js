// An agent with two JavaScript tools: the model (through `forge serve`'s tool calling) looks a fact up,
// then computes with it; the tools run here.
//
//   forge serve smollm2 --api-key sk-local
//   FORGE_BASE_URL=http://127.0.0.1:8000 FORGE_API_KEY=sk-local node examples/agent.js ["your task"]
//
// Every call is decoded under the tool's JSON schema, so even a 135M model never writes a malformed one.

import { pathToFileURL } from "node:url";

import { Agent, Forge, tool } from "forge-llm";

const LANDMARKS = {
  "Eiffel Tower": "The Eiffel Tower is 330 metres tall.",
  "Mount Everest": "Mount Everest is 8849 metres high.",
  "Great Pyramid": "The Great Pyramid of Giza is 139 metres tall.",
};
export const TASK =
  "Use the lookup tool to find the height of the Eiffel Tower in metres, " +
  "then use the calculator to multiply it by 3.28 to get feet.";

export const lookup = tool({
  name: "lookup",
  description: "Look up a landmark in the encyclopedia.",
  parameters: {
    type: "object",
    properties: { topic: { type: "string", enum: Object.keys(LANDMARKS), description: "the landmark" } },
    required: ["topic"],
  },
  run: ({ topic }) => LANDMARKS[topic],
});

const OPERATIONS = { multiply: ["*", (a, b) => a * b], divide: ["/", (a, b) => a / b], add: ["+", (a, b) => a + b] };
export const calculator = tool({
  name: "calculator",
  description: "Compute a (operation) b.",
  parameters: {
    type: "object",
    properties: {
      a: { type: "number", description: "the first number" },
      operation: { type: "string", enum: Object.keys(OPERATIONS) },
      b: { type: "number", description: "the second number" },
    },
    required: ["a", "operation", "b"],
  },
  timeout: 5,
  run: ({ a, operation, b }) => {
    const [symbol, op] = OPERATIONS[operation];
    return `${a} ${symbol} ${b} = ${Math.round(op(a, b) * 100) / 100}`;
  },
});

/** The example's agent: greedy, so the same run every time. */
export function makeAgent(app, options = {}) {
  return new Agent(app, { tools: [lookup, calculator], maxIterations: 4, maxTokens: 96, ...options });
}

async function main(task) {
  const agent = makeAgent(new Forge());
  for await (const event of agent.stream(task)) {
    // typed events: token, tool_call, tool_result, final, error
    if (event.type === "tool_call") console.log(`call   ${event.name}(${JSON.stringify(event.arguments)})`);
    else if (event.type === "tool_result") console.log(`result ${event.content}${event.error ? "  (error)" : ""}`);
    else if (event.type === "final")
      console.log(`answer ${event.answer}\ndone   after ${event.steps} steps (${event.reason})`);
    else if (event.type === "error") console.log(`error  ${event.error}`);
  }
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) await main(process.argv[2] ?? TASK);
