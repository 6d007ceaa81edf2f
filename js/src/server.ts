/**
 * `ServerBackend`: the model behind `forge serve`, over its OpenAI-compatible HTTP API.
 *
 * Requests and server-sent events go through the official `openai` client; the server's
 * OpenAI-style errors become the ForgeError tree (errors.ts), with their status and `param`.
 */

import OpenAI from "openai";

import type { Backend, CallOptions, RagQueryOptions } from "./backend.js";
import type { Context } from "./context.js";
import { AbortError, ConnectionError, ForgeError, apiError, isRecord } from "./errors.js";
import { type Completion, OPTION_FIELDS, type Source, type ToolCall } from "./types.js";

export interface ServerOptions {
  /** The server's address, with or without /v1: "http://127.0.0.1:8000". */
  baseURL: string;
  /** Sent as `Authorization: Bearer KEY` (`forge serve --api-key KEY`); none: no header. */
  apiKey?: string | undefined;
  /** The model id to name in requests (default: whatever the server serves). */
  model?: string | undefined;
  /** Seconds to wait for a response (default 600). */
  timeout?: number | undefined;
  /** A fetch implementation (default: the global one). */
  fetch?: typeof fetch | undefined;
  /** Extra headers on every request. */
  headers?: Record<string, string> | undefined;
}

type Body = Record<string, unknown>;
type Chunk = Record<string, any>;
const CHOICES = new Set(["auto", "none", "required"]);

export class ServerBackend implements Backend {
  readonly name: string;
  readonly model: string | undefined;
  private readonly client: OpenAI;

  constructor(options: ServerOptions) {
    this.name = options.baseURL.replace(/\/+$/, "").replace(/\/v1$/, "");
    this.model = options.model;
    this.client = new OpenAI({
      baseURL: `${this.name}/v1`,
      apiKey: options.apiKey ?? "unused",
      // Without a key, send no Authorization header at all.
      defaultHeaders: { ...options.headers, ...(options.apiKey ? {} : { Authorization: null }) },
      maxRetries: 0, // retrying is the retry() middleware's job, visible in the stack
      timeout: (options.timeout ?? 600) * 1000,
      ...(options.fetch ? { fetch: options.fetch } : {}),
      dangerouslyAllowBrowser: true, // the key is for your own forge serve, which the page calls anyway
    });
  }

  async handle(ctx: Context): Promise<void> {
    const { chat, body } = this.body(ctx);
    const options = { signal: ctx.signal, headers: { "X-Request-Id": ctx.id } };
    if (ctx.stream) {
      const streaming = { ...body, stream: true, stream_options: { include_usage: true } };
      const stream = await this.call(ctx.signal, () => this.create(chat, streaming, options));
      ctx.chunks = this.pieces(stream as AsyncIterable<Chunk>, ctx, chat);
      return;
    }
    const reply = (await this.call(ctx.signal, () => this.create(chat, body, options))) as Chunk;
    const choice = reply["choices"][0];
    ctx.response = (chat ? choice.message.content : choice.text) ?? "";
    const calls = chat ? (choice.message.tool_calls ?? []) : [];
    ctx.completion = completion(reply, choice.finish_reason, calls.map(toolCall));
  }

  async embed(texts: string[], options: CallOptions = {}): Promise<number[][]> {
    const body = { input: texts, encoding_format: "float", ...(this.model ? { model: this.model } : {}) };
    const reply = await this.call(options.signal, () =>
      this.client.embeddings.create(body as never, { signal: options.signal }),
    );
    return [...reply.data].sort((a, b) => a.index - b.index).map((row) => row.embedding);
  }

  async ragQuery(question: string, options: RagQueryOptions = {}): Promise<Source[]> {
    const body = { query: question, k: options.k, filter: options.filter };
    const reply = await this.call(options.signal, () =>
      this.client.post<{ data: Source[] }>("/rag/query", { body, signal: options.signal }),
    );
    return reply.data;
  }

  async models(options: CallOptions = {}): Promise<string[]> {
    const page = await this.call(options.signal, () => this.client.models.list({ signal: options.signal }));
    return page.data.map((card) => card.id);
  }

  /** POST the body to /v1/chat/completions or /v1/completions: the reply, or a stream of chunks. */
  private create(
    chat: boolean,
    body: Body,
    options: { signal?: AbortSignal | undefined; headers?: Record<string, string> },
  ): PromiseLike<unknown> {
    return chat
      ? this.client.chat.completions.create(body as never, options)
      : this.client.completions.create(body as never, options);
  }

  /** The route and the JSON body for `ctx`: a schema or tools need the chat route. */
  private body(ctx: Context): { chat: boolean; body: Body } {
    const p = ctx.params;
    const body: Body = this.model ? { model: this.model } : {};
    for (const [name, wire] of Object.entries(OPTION_FIELDS)) {
      const value = p[name as keyof typeof OPTION_FIELDS];
      if (value !== undefined) body[wire] = value;
    }
    const chat = ctx.messages !== null || p.schema !== undefined || p.tools !== undefined;
    if (!chat) return { chat, body: { ...body, prompt: ctx.prompt ?? "" } };
    body["messages"] = ctx.messages ?? [{ role: "user", content: ctx.prompt ?? "" }];
    if (p.schema !== undefined) {
      body["response_format"] = { type: "json_schema", json_schema: { name: "response", schema: p.schema } };
    }
    if (p.tools !== undefined) body["tools"] = p.tools;
    if (p.toolChoice !== undefined) {
      const name = p.toolChoice;
      body["tool_choice"] = CHOICES.has(name) ? name : { type: "function", function: { name } };
    }
    if (p.parallelToolCalls !== undefined) body["parallel_tool_calls"] = p.parallelToolCalls;
    return { chat, body };
  }

  /** The text pieces of a stream; its end sets `ctx.completion`, and leaving it early closes the connection. */
  private async *pieces(stream: AsyncIterable<Chunk>, ctx: Context, chat: boolean): AsyncGenerator<string> {
    const calls = new Map<number, { id: string; name: string; arguments: string }>();
    let first: Chunk | null = null;
    let last: Chunk | null = null;
    let finish: string | null = null;
    try {
      for await (const chunk of stream) {
        first ??= chunk;
        last = chunk;
        const choice = chunk["choices"]?.[0];
        if (!choice) continue;
        finish = choice.finish_reason ?? finish;
        const piece: string | undefined = chat ? choice.delta?.content : choice.text;
        for (const delta of (chat && choice.delta?.tool_calls) || []) {
          const call = calls.get(delta.index) ?? { id: "", name: "", arguments: "" };
          call.id ||= delta.id ?? "";
          call.name ||= delta.function?.name ?? "";
          call.arguments += delta.function?.arguments ?? "";
          calls.set(delta.index, call);
        }
        if (piece) yield piece;
      }
    } catch (error) {
      throw this.error(error, ctx.signal);
    }
    if (ctx.signal?.aborted) throw this.error(ctx.signal.reason, ctx.signal); // openai ends quietly on abort
    const toolCalls = [...calls.values()].map((c) => toolCall({ id: c.id, function: c }));
    ctx.completion = completion({ ...last, sources: first?.["sources"] }, finish, toolCalls);
  }

  /** Run an openai call, its failures as ForgeErrors. */
  private async call<T>(signal: AbortSignal | undefined, fn: () => PromiseLike<T>): Promise<T> {
    try {
      return await fn();
    } catch (error) {
      throw this.error(error, signal);
    }
  }

  private error(error: unknown, signal: AbortSignal | undefined): unknown {
    if (error instanceof ForgeError) return error;
    if (signal?.aborted || error instanceof OpenAI.APIUserAbortError) {
      return new AbortError(undefined, { cause: error });
    }
    if (error instanceof OpenAI.APIConnectionTimeoutError) {
      return new ConnectionError(`the Forge server at ${this.name} did not answer in time; raise timeout`, {
        cause: error,
      });
    }
    if (error instanceof OpenAI.APIConnectionError) {
      const why = error.cause instanceof Error ? `: ${error.cause.message}` : "";
      return new ConnectionError(
        `could not reach the Forge server at ${this.name}${why}; is \`forge serve MODEL\` running there?`,
        { cause: error },
      );
    }
    if (error instanceof OpenAI.APIError) {
      // An error event inside a stream has no status of its own: the server failed after it began.
      return apiError(error.status ?? 500, { error: error.error }, error.headers ?? null, error);
    }
    return error;
  }
}

function toolCall(call: { id?: string; function: { name: string; arguments: string } }): ToolCall {
  let parsed: unknown;
  try {
    parsed = JSON.parse(call.function.arguments || "{}");
  } catch {
    throw new ForgeError(
      `the server sent tool call ${call.function.name} with arguments that are not JSON: ` +
        `${call.function.arguments.slice(0, 80)}; raise maxTokens if the reply was cut short`,
    );
  }
  return { id: call.id ?? "", name: call.function.name, arguments: isRecord(parsed) ? parsed : {} };
}

function completion(reply: Chunk, finishReason: string | null, toolCalls: ToolCall[]): Completion {
  const usage = reply["usage"];
  return {
    finishReason,
    promptTokens: usage?.prompt_tokens ?? null,
    completionTokens: usage?.completion_tokens ?? null,
    toolCalls,
    sources: reply["sources"] ?? null,
    model: reply["model"] ?? null,
  };
}
