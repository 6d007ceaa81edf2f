/**
 * `Agent`: the model calls JavaScript tools, through the server's tool calling, until it can answer.
 *
 * Each step asks for one tool call under the tools' JSON schemas (the server decodes under a grammar,
 * so a call is always well-formed, even from a 135M model) and runs it here, in the client. As in
 * Python's agent: the first step must call one of your tools; after that `final_answer` ends the calls;
 * a call repeated from an earlier step is not run again (its tool is withheld for one step, and a second
 * repeat ends the calls); after `maxIterations` steps or `timeBudget` seconds the model answers from what
 * it gathered; and an answer that leaves out the tool's figures gets the last result quoted.
 *
 *     const agent = new Agent(app, { tools: [lookup, calculator], maxIterations: 4 });
 *     for await (const event of agent.stream(task)) if (event.type === "final") console.log(event.answer);
 */

import { AbortError, AgentError, ConfigError, ForgeError, ToolError, preview } from "./errors.js";
import type { Forge } from "./forge.js";
import { seconds } from "./stack.js";
import {
  type ChatMessage,
  type GenerationOptions,
  type JsonSchema,
  type ToolCall,
  type ToolDefinition,
  checkOptions,
} from "./types.js";
import {
  type AgentEvent,
  type Tool,
  type ToolCallEvent,
  type ToolResultEvent,
  argumentsText,
  checkTool,
  stepMessages,
} from "./tools.js";

export const FINAL = "final_answer";
const INSTRUCTIONS =
  "Solve the user's task step by step. Call one tool at a time and use its result. " +
  `When you have everything you need, call ${FINAL}.`;
const ANSWER = (task: string, results: string): string =>
  `Question: ${task}\nTool results:\n${results}\n\nAnswer the question in one sentence, quoting the tool result.`;
const FINAL_TOOL: ToolDefinition = {
  type: "function",
  function: {
    name: FINAL,
    description: "Call this once the tool results hold everything needed to answer the user's task.",
    parameters: { type: "object", properties: {} },
  },
};

export type Reason = "answer" | "max_iterations" | "time_budget";

export interface AgentOptions extends GenerationOptions {
  /** The tools the model may call. */
  tools: Tool[];
  /** Your instructions, before Forge's. */
  system?: string;
  /** Tool-calling steps at most (default 6); then the model answers. */
  maxIterations?: number;
  /** Seconds for the whole run (default 120; null: none); then the model answers. */
  timeBudget?: number | null;
  /** What timeBudget is measured with, in seconds (a test passes its own). */
  clock?: () => number;
}

export interface AgentResult {
  answer: string;
  reason: Reason;
  steps: number;
  /** Every event of the run. */
  trace: AgentEvent[];
  /** The conversation as the model last saw it. */
  messages: ChatMessage[];
  /** The tool_call events. */
  toolCalls: ToolCallEvent[];
}

interface Run {
  task: string;
  messages: ChatMessage[];
  results: Map<string, { call: ToolCall; result: ToolResultEvent }>; // tool + arguments -> its result, in call order
  blocked: Set<string>;
  reason: Reason;
  step: number;
  over: boolean;
  started: number;
  signal: AbortSignal | undefined;
}

const AGENT_OPTIONS = ["tools", "system", "maxIterations", "timeBudget", "clock"];
const RESERVED = ["schema", "tools", "toolChoice", "parallelToolCalls", "stop"];

export class Agent {
  readonly tools: Map<string, Tool>;
  readonly maxIterations: number;
  readonly timeBudget: number | null;
  private readonly system: string | undefined;
  private readonly clock: () => number;
  private readonly generation: GenerationOptions;

  constructor(
    readonly app: Forge,
    options: AgentOptions,
  ) {
    if (typeof app?.request !== "function" || typeof app?.handleStream !== "function") {
      throw new ConfigError(`new Agent(app, ...) needs a Forge app, got ${preview(app)}`, { field: "app" });
    }
    const { tools, system, maxIterations = 6, timeBudget = 120, clock = seconds, ...generation } = options ?? {};
    if (!Number.isInteger(maxIterations) || maxIterations < 1) {
      throw ConfigError.forField("Agent", "maxIterations", maxIterations, "must be a positive integer");
    }
    if (timeBudget !== null && !(typeof timeBudget === "number" && timeBudget > 0)) {
      throw ConfigError.forField("Agent", "timeBudget", timeBudget, "must be > 0 seconds, or null for none");
    }
    const reserved = Object.keys(generation).filter((k) => RESERVED.includes(k));
    if (reserved.length) throw new ConfigError(`Agent sets ${reserved.join(", ")} itself; leave them out`);
    const unknown = Object.keys(generation).filter((k) => !AGENT_OPTIONS.includes(k));
    checkOptions("new Agent()", Object.fromEntries(unknown.map((k) => [k, null])));
    if (!Array.isArray(tools) || !tools.length) {
      throw new ConfigError(`new Agent(app, { tools }) needs a non-empty list of tools, got ${preview(tools)}`, {
        field: "tools",
      });
    }
    this.tools = new Map();
    for (const t of tools) {
      checkTool(t, FINAL);
      if (this.tools.has(t.name)) throw new ConfigError(`two tools are named ${JSON.stringify(t.name)}; rename one`);
      this.tools.set(t.name, t);
    }
    this.system = system;
    this.maxIterations = maxIterations;
    this.timeBudget = timeBudget;
    this.clock = clock;
    this.generation = { temperature: 0, maxTokens: 512, ...generation };
  }

  /** Do `task`: the final answer and the trace. Throws AgentError if the model fails. */
  async run(task: string, options: { signal?: AbortSignal } = {}): Promise<AgentResult> {
    const trace: AgentEvent[] = [];
    const run = this.start(task, options.signal);
    for await (const event of this.events(run)) {
      trace.push(event);
      if (event.type === "error") {
        throw new AgentError(`the agent failed at step ${event.step}: ${message(event.error)}`, {
          cause: event.error,
        });
      }
      if (event.type === "final") {
        const toolCalls = trace.filter((e): e is ToolCallEvent => e.type === "tool_call");
        return {
          answer: event.answer,
          reason: event.reason,
          steps: event.steps,
          trace,
          messages: run.messages,
          toolCalls,
        };
      }
    }
    throw new AgentError("the agent stopped without an answer; this is a bug in forge-llm");
  }

  /** The run as typed events: token, tool_call, tool_result, and last final (or error). */
  async *stream(task: string, options: { signal?: AbortSignal } = {}): AsyncGenerator<AgentEvent> {
    yield* this.events(this.start(task, options.signal));
  }

  private start(task: string, signal: AbortSignal | undefined): Run {
    if (typeof task !== "string" || !task.trim()) {
      throw new ConfigError(`agent.run(task) needs a non-empty string, got ${preview(task)}`, { field: "task" });
    }
    const system = this.system ? `${this.system}\n\n${INSTRUCTIONS}` : INSTRUCTIONS;
    const messages: ChatMessage[] = [
      { role: "system", content: system },
      { role: "user", content: task },
    ];
    const started = this.clock();
    return {
      task,
      messages,
      results: new Map(),
      blocked: new Set(),
      reason: "max_iterations",
      step: 0,
      over: false,
      started,
      signal,
    };
  }

  private async *events(run: Run): AsyncGenerator<AgentEvent> {
    while (run.step < this.maxIterations && !run.over) {
      if (this.timeLeft(run) === 0) {
        run.reason = "time_budget";
        break;
      }
      run.step += 1;
      let failed = false;
      for await (const event of this.step(run)) {
        failed ||= event.type === "error";
        yield event;
      }
      if (failed) return;
    }
    yield* this.answer(run);
  }

  /** Seconds left of the time budget (0 once spent); null without one. */
  private timeLeft(run: Run): number | null {
    return this.timeBudget === null ? null : Math.max(0, this.timeBudget - (this.clock() - run.started));
  }

  /** One step: the model calls a tool, and the new calls run. */
  private async *step(run: Run): AsyncGenerator<AgentEvent> {
    const schemas = [...this.tools.values()].map((t) => t.definition ?? definition(t));
    // The first step uses one of your tools: a task given to an agent with tools is one to use them on.
    const offered = (run.step > 1 ? [...schemas, FINAL_TOOL] : schemas).filter(
      (s) => !run.blocked.has(s.function.name),
    );
    const ctx = this.app.request(
      { messages: run.messages },
      { ...this.generation, tools: offered, toolChoice: "required", parallelToolCalls: false, signal: run.signal },
      true,
    );
    try {
      for await (const text of this.app.handleStream(ctx)) yield { type: "token", text, step: run.step };
    } catch (error) {
      if (error instanceof AbortError) throw error;
      yield { type: "error", error, step: run.step };
      return;
    }
    const calls = ctx.completion?.toolCalls ?? [];
    if (!calls.length) {
      const error = new ForgeError(
        `the model's reply ended before its tool call was complete; raise maxTokens (now ${this.generation.maxTokens})`,
      );
      yield { type: "error", error, step: run.step };
      return;
    }
    const done = calls.find((c) => c.name === FINAL);
    if (done) {
      yield { type: "tool_call", id: done.id, name: FINAL, arguments: done.arguments, step: run.step };
      run.reason = "answer";
      run.over = true;
      return;
    }
    const fresh = dedupe(calls).filter((c) => !run.results.has(key(c)));
    if (!fresh.length) {
      // A repeated call: once, the model may want another tool; twice, it has nothing new to do.
      if (run.blocked.size) run.over = true;
      else run.blocked = new Set(calls.map((c) => c.name));
      run.reason = "answer";
      return;
    }
    run.blocked = new Set();
    run.reason = "max_iterations";
    for (const call of fresh) {
      yield { type: "tool_call", id: call.id, name: call.name, arguments: call.arguments, step: run.step };
      const result = await this.call(call, run);
      run.results.set(key(call), { call, result });
      yield result;
    }
    run.messages.push(...stepMessages(fresh, (c) => run.results.get(key(c))!.result.content));
  }

  /** Run one tool; its failure is its result, so the model can read it and carry on. */
  private async call(call: ToolCall, run: Run): Promise<ToolResultEvent> {
    const began = seconds();
    const tool = this.tools.get(call.name);
    const result = (content: string, error: boolean): ToolResultEvent => ({
      type: "tool_result",
      id: call.id,
      name: call.name,
      content,
      error,
      elapsed: seconds() - began,
      step: run.step,
    });
    const remaining = this.timeLeft(run);
    if (tool === undefined) return result(`error: there is no tool ${JSON.stringify(call.name)}`, true);
    if (remaining === 0)
      return result(`error: tool ${JSON.stringify(call.name)} was not run: the agent's time budget is spent`, true);
    const limit = Math.min(tool.timeout ?? Infinity, remaining ?? Infinity);
    try {
      return result(asText(await runTool(tool, call.arguments, limit, run.signal)), false);
    } catch (error) {
      if (error instanceof AbortError) throw error;
      return result(error instanceof ToolError ? `error: ${error.message}` : `error: ${message(error)}`, true);
    }
  }

  /** The answer, in the model's words, from the task and the results (newest first), then the quote check. */
  private async *answer(run: Run): AsyncGenerator<AgentEvent> {
    const results = [...run.results.values()].reverse();
    const found = results.length
      ? results
          .map(({ call, result }) => `- ${call.name}(${argumentsText(call.arguments)}) returned: ${result.content}`)
          .join("\n")
      : "- none";
    const messages: ChatMessage[] = this.system ? [{ role: "system", content: this.system }] : [];
    messages.push({ role: "user", content: ANSWER(run.task, found) });
    run.messages.splice(0, run.messages.length, ...messages);
    const step = run.step + 1;
    let answer = "";
    try {
      for await (const text of this.app.chatStream(messages, { ...this.generation, signal: run.signal })) {
        answer += text;
        yield { type: "token", text, step };
      }
    } catch (error) {
      if (error instanceof AbortError) throw error;
      yield { type: "error", error, step };
      return;
    }
    answer = answer.trim();
    const quote = quoteOf(
      answer,
      results
        .map((r) => r.result)
        .filter((r) => !r.error)
        .reverse(),
    );
    if (quote) {
      answer = answer ? `${answer} ${quote}` : quote.slice(1, -1);
      yield { type: "token", text: ` ${quote}`, step };
    }
    run.messages.push({ role: "assistant", content: answer });
    yield { type: "final", answer, reason: run.reason, steps: step };
  }
}

function definition(tool: Tool): ToolDefinition {
  const parameters: JsonSchema = tool.parameters ?? { type: "object", properties: {} };
  return { type: "function", function: { name: tool.name, description: tool.description ?? "", parameters } };
}

const key = (call: { name: string; arguments: Record<string, unknown> }): string =>
  `${call.name}:${stableJson(call.arguments)}`;

function stableJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(stableJson).join(",")}]`;
  if (value && typeof value === "object") {
    const entries = Object.entries(value).sort(([a], [b]) => (a < b ? -1 : 1));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${stableJson(v)}`).join(",")}}`;
  }
  return JSON.stringify(value);
}

function dedupe<T extends { name: string; arguments: Record<string, unknown> }>(calls: T[]): T[] {
  return [...new Map(calls.map((c) => [key(c), c])).values()];
}

async function runTool(
  tool: Tool,
  args: Record<string, unknown>,
  limit: number,
  outer: AbortSignal | undefined,
): Promise<unknown> {
  const missing = (tool.parameters?.["required"] as string[] | undefined)?.filter((k) => !(k in args)) ?? [];
  if (missing.length) throw new ToolError(`tool ${tool.name} needs ${missing.join(", ")}`);
  const controller = new AbortController();
  const stop = (): void => controller.abort(outer?.reason);
  outer?.addEventListener("abort", stop, { once: true });
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    if (Number.isFinite(limit)) {
      timer = setTimeout(() => {
        controller.abort();
        reject(
          new ToolError(`tool ${JSON.stringify(tool.name)} was stopped after ${limit.toFixed(1)} s, its time limit`),
        );
      }, limit * 1000);
    }
  });
  const aborted = new Promise<never>((_, reject) => {
    controller.signal.addEventListener("abort", () => outer?.aborted && reject(new AbortError()), { once: true });
  });
  try {
    return await Promise.race([
      Promise.resolve().then(() => tool.run(args, { signal: controller.signal })),
      timeout,
      aborted,
    ]);
  } finally {
    clearTimeout(timer);
    outer?.removeEventListener("abort", stop);
  }
}

function asText(value: unknown): string {
  if (typeof value === "string") return value;
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}

const NUMBER = /\d+(?:\.\d+)?/g;
const THOUSANDS = /(?<=\d),(?=\d{3}\b)/g; // 48,213 is 48213
const numbers = (text: string): string[] => text.replace(THOUSANDS, "").match(NUMBER) ?? [];

/** The last result quoted, when the answer has the last number of none of the results; null otherwise. */
function quoteOf(answer: string, results: ToolResultEvent[]): string | null {
  const said = new Set(numbers(answer));
  const figures = results.map((r) => numbers(r.content).at(-1)).filter((n): n is string => n !== undefined);
  if (!figures.length || figures.some((n) => said.has(n))) return null;
  const last = [...results].reverse().find((r) => numbers(r.content).length)!;
  return `(${last.name} returned "${last.content}")`;
}

function message(error: unknown): string {
  return error instanceof Error ? `${error.name}: ${error.message}` : String(error);
}
