/** The shapes the API takes and returns: options, messages, tools, completions, RAG hits. */

import { ConfigError, preview } from "./errors.js";

/** A JSON schema (an object such as `{ type: "object", properties: {...} }`). */
export type JsonSchema = Record<string, unknown>;

/** An OpenAI tool definition, as `forge serve` takes it. */
export interface ToolDefinition {
  type: "function";
  function: { name: string; description?: string; parameters?: JsonSchema };
}

/** A tool call of the model: the tool's name and its arguments, parsed. */
export interface ToolCall {
  id: string;
  name: string;
  arguments: Record<string, unknown>;
}

/** A message of a chat, in OpenAI's shape. */
export interface ChatMessage {
  role: "system" | "developer" | "user" | "assistant" | "tool";
  content: string | null;
  name?: string;
  tool_calls?: { id: string; type: "function"; function: { name: string; arguments: string } }[];
  tool_call_id?: string;
}

/**
 * Generation options, Python's GenerationConfig fields in camelCase (`max_tokens` is `maxTokens`).
 * Their ranges are the server's: a value out of range is a BadRequestError naming the field.
 */
export interface GenerationOptions {
  maxTokens?: number;
  temperature?: number;
  topP?: number;
  topK?: number;
  minP?: number;
  repetitionPenalty?: number;
  presencePenalty?: number;
  frequencyPenalty?: number;
  seed?: number;
  stop?: string | string[];
}

/** Everything a request may carry besides its prompt: generation options and structure. */
export interface RequestOptions extends GenerationOptions {
  /** A JSON schema the reply must match; the reply is returned parsed. */
  schema?: JsonSchema;
  /** Tools the model may call (chat only). */
  tools?: ToolDefinition[];
  /** "auto", "none", "required", or a tool's name. */
  toolChoice?: "auto" | "none" | "required" | string;
  /** Whether one reply may call several tools (default: the server's, true). */
  parallelToolCalls?: boolean;
  /** Cancels the request; the server sees the disconnect and stops generating. */
  signal?: AbortSignal;
  /** Free-form data for middleware (`ctx.meta`); never sent. */
  meta?: Record<string, unknown>;
  /** The request's id (`ctx.id`, and the server's X-Request-Id); made when absent. */
  id?: string;
}

/** The option names, each with the server's name for it. */
export const OPTION_FIELDS: Readonly<Record<keyof GenerationOptions, string>> = {
  maxTokens: "max_tokens",
  temperature: "temperature",
  topP: "top_p",
  topK: "top_k",
  minP: "min_p",
  repetitionPenalty: "repetition_penalty",
  presencePenalty: "presence_penalty",
  frequencyPenalty: "frequency_penalty",
  seed: "seed",
  stop: "stop",
};

const OTHER_OPTIONS = ["schema", "tools", "toolChoice", "parallelToolCalls", "signal", "meta", "id"] as const;
const KNOWN = new Set<string>([...Object.keys(OPTION_FIELDS), ...OTHER_OPTIONS]);

/** A request's options with its generation parameters apart: what middleware reads and changes. */
export type Params = Omit<RequestOptions, "signal" | "meta" | "id">;

/** How a generation ended, once known: `ctx.completion`. */
export interface Completion {
  /** "stop", "length" or "tool_calls". */
  finishReason: string | null;
  promptTokens: number | null;
  completionTokens: number | null;
  /** The tool calls of a chat reply (empty without tools). */
  toolCalls: ToolCall[];
  /** The passages a RAG server grounded the reply in, numbered as the reply cites them; null elsewhere. */
  sources: Source[] | null;
  /** The model that answered, as the server names it. */
  model: string | null;
}

/** A chunk a RAG server retrieved: what `rag.query` returns and a grounded reply cites. */
export interface Source {
  text: string;
  source: string;
  score: number;
  start?: number;
  end?: number;
  number?: number;
  metadata?: Record<string, unknown>;
}

/** Check a request's options: unknown names are refused with the closest known one. */
export function checkOptions(call: string, options: object | undefined): void {
  if (options === undefined) return;
  if (typeof options !== "object" || options === null || Array.isArray(options)) {
    throw new ConfigError(`${call} takes its options as an object, got ${preview(options)}`);
  }
  for (const key of Object.keys(options)) {
    if (!KNOWN.has(key)) {
      const hint = suggest(key);
      throw new ConfigError(
        `${call} has no option ${JSON.stringify(key)}${hint ? `; did you mean ${JSON.stringify(hint)}?` : ""} ` +
          `(options: ${[...KNOWN].join(", ")})`,
        { field: key },
      );
    }
  }
}

function suggest(key: string): string | null {
  const camel = key.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase());
  if (KNOWN.has(camel)) return camel;
  const lower = key.toLowerCase();
  return [...KNOWN].find((k) => k.toLowerCase() === lower || distance(k.toLowerCase(), lower) <= 2) ?? null;
}

function distance(a: string, b: string): number {
  const row = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let diagonal = row[0]!;
    row[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const above = row[j]!;
      row[j] = Math.min(row[j]! + 1, row[j - 1]! + 1, diagonal + (a[i - 1] === b[j - 1] ? 0 : 1));
      diagonal = above;
    }
  }
  return row[b.length]!;
}
