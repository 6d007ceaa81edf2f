/** An agent's tools (JavaScript functions with a JSON schema) and the typed events of its runs. */

import { ConfigError, preview } from "./errors.js";
import type { ChatMessage, JsonSchema, ToolCall, ToolDefinition } from "./types.js";

/** A tool the model may call: what it does, its arguments' JSON schema, and the function that does it. */
export interface Tool<A extends Record<string, any> = Record<string, any>> {
  /** 1-64 letters, digits, "_", "." or "-". */
  name: string;
  /** What it does: the model reads this to choose it. */
  description?: string;
  /** The JSON schema of its arguments (an object schema); none: it takes no arguments. */
  parameters?: JsonSchema;
  /** Does the work; its return value (text, or JSON-able) is what the model reads. It may be async. */
  run: (args: A, info: { signal: AbortSignal }) => unknown;
  /** Seconds it may take (default: the agent's time budget left). */
  timeout?: number;
  /** Set by tool(): the OpenAI tool definition sent to the server. */
  readonly definition?: ToolDefinition;
}

const NAME = /^[A-Za-z0-9_.-]{1,64}$/;

/** Check a tool definition and give it its OpenAI definition. */
export function tool<A extends Record<string, any>>(spec: Tool<A>): Tool<A> {
  checkTool(spec as Tool);
  const parameters: JsonSchema = spec.parameters ?? { type: "object", properties: {} };
  const definition: ToolDefinition = {
    type: "function",
    function: { name: spec.name, description: spec.description ?? "", parameters },
  };
  return { ...spec, parameters, definition };
}

export function checkTool(t: Tool, reserved?: string): void {
  if (typeof t !== "object" || t === null) {
    throw new ConfigError(`a tool is an object { name, description, parameters, run }, got ${preview(t)}`);
  }
  if (typeof t.name !== "string" || !NAME.test(t.name)) {
    throw new ConfigError(`tool name ${preview(t.name)} must be 1-64 letters, digits, "_", "." or "-"`, {
      field: "name",
    });
  }
  if (t.name === reserved) {
    throw new ConfigError(`the tool name ${JSON.stringify(reserved)} is the agent's own; rename your tool`);
  }
  if (typeof t.run !== "function") {
    throw new ConfigError(`tool ${t.name} needs run: (args) => result, got ${preview(t.run)}`, { field: "run" });
  }
  const p = t.parameters;
  if (p !== undefined && (typeof p !== "object" || p === null || p["type"] !== "object")) {
    throw new ConfigError(`tool ${t.name}'s parameters must be an object schema ({ type: "object", ... })`, {
      field: "parameters",
    });
  }
  if (t.timeout !== undefined && !(typeof t.timeout === "number" && t.timeout > 0)) {
    throw new ConfigError(`tool ${t.name}'s timeout must be > 0 seconds, got ${preview(t.timeout)}`, {
      field: "timeout",
    });
  }
}

/** A piece of text the model wrote in step `step`. */
export interface AgentTokenEvent {
  type: "token";
  text: string;
  step: number;
}
/** The model called `name` with `arguments`. */
export interface ToolCallEvent {
  type: "tool_call";
  id: string;
  name: string;
  arguments: Record<string, unknown>;
  step: number;
}
/** What a tool returned (`error`: it threw or timed out, and `content` says how). */
export interface ToolResultEvent {
  type: "tool_result";
  id: string;
  name: string;
  content: string;
  error: boolean;
  /** Seconds the tool ran. */
  elapsed: number;
  step: number;
}
/** The answer; `reason` says whether the model answered or a limit made it. */
export interface FinalEvent {
  type: "final";
  answer: string;
  reason: "answer" | "max_iterations" | "time_budget";
  steps: number;
}
/** The model failed (a tool's failure is a ToolResultEvent instead). */
export interface AgentFailureEvent {
  type: "error";
  error: unknown;
  step: number;
}

export type AgentEvent = AgentTokenEvent | ToolCallEvent | ToolResultEvent | FinalEvent | AgentFailureEvent;

/** The assistant's calls and the tools' results, as the next step's messages. */
export function stepMessages(calls: ToolCall[], content: (call: ToolCall) => string): ChatMessage[] {
  const assistant: ChatMessage = {
    role: "assistant",
    content: null,
    tool_calls: calls.map((c) => ({
      id: c.id,
      type: "function",
      function: { name: c.name, arguments: JSON.stringify(c.arguments) },
    })),
  };
  const results: ChatMessage[] = calls.map((c) => ({
    role: "tool",
    tool_call_id: c.id,
    name: c.name,
    content: content(c),
  }));
  return [assistant, ...results];
}

/** `a=1, b="x"`: a call's arguments as the answer prompt shows them. */
export function argumentsText(args: Record<string, unknown>): string {
  return Object.entries(args)
    .map(([k, v]) => `${k}=${JSON.stringify(v)}`)
    .join(", ");
}
