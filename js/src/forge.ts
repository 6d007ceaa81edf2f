/**
 * `Forge`: the chainable app object, over `forge serve` (or any Backend).
 *
 *     const app = new Forge({ baseURL: "http://127.0.0.1:8000" }).use(logger()).on("token", (e) => ...);
 *     const text = await app.generate("Once upon a time", { maxTokens: 32 });
 *     for await (const piece of app.stream("Once upon a time")) process.stdout.write(piece);
 */

import type { Backend, CallOptions } from "./backend.js";
import { Context, type Middleware } from "./context.js";
import { ConfigError, ForgeError, preview } from "./errors.js";
import { Emitter, type EventMap, type EventName, type Listener } from "./events.js";
import { Rag } from "./rag.js";
import { ServerBackend } from "./server.js";
import { Stack } from "./stack.js";
import {
  type ChatMessage,
  type GenerationOptions,
  type JsonSchema,
  type Params,
  type RequestOptions,
  checkOptions,
} from "./types.js";
import { WebBackend } from "./web.js";

/** Where `new Forge()` looks without a baseURL (and without FORGE_BASE_URL): `forge serve`'s default. */
export const DEFAULT_BASE_URL = "http://127.0.0.1:8000";

export interface ForgeOptions {
  /** The `forge serve` address (default: FORGE_BASE_URL, else http://127.0.0.1:8000). */
  baseURL?: string;
  /** The server's API key (default: FORGE_API_KEY; none: no Authorization header). */
  apiKey?: string;
  /** The model id to name in requests (default: the one the server serves). */
  model?: string;
  /** Seconds to wait for a response (default 600). */
  timeout?: number;
  /** A fetch implementation (default: the global one). */
  fetch?: typeof fetch;
  /** Extra headers on every request. */
  headers?: Record<string, string>;
  /** Generation options under every request's own. */
  defaults?: GenerationOptions;
  /** Run requests on this backend instead of a server. */
  backend?: Backend;
  /** A `forge export --format web` folder to run in the page (its URL, such as "./smol-web/"): no server. */
  web?: string;
}

const FORGE_OPTIONS = ["baseURL", "apiKey", "model", "timeout", "fetch", "headers", "defaults", "backend", "web"];
type Messages = ChatMessage[] | string;

export class Forge {
  readonly backend: Backend;
  readonly defaults: GenerationOptions;
  /** RAG over the server's store: `app.rag.query(question)`, `app.rag.answer(question)`. */
  readonly rag: Rag;
  private readonly emitter = new Emitter();
  private readonly stack: Stack;

  constructor(options: ForgeOptions = {}) {
    for (const key of Object.keys(options)) {
      if (!FORGE_OPTIONS.includes(key)) {
        throw new ConfigError(`new Forge() has no option ${preview(key)}; options: ${FORGE_OPTIONS.join(", ")}`, {
          field: key,
        });
      }
    }
    if (options.web !== undefined && options.backend !== undefined) {
      throw new ConfigError("new Forge() takes { web } or { backend }, not both", { field: "web" });
    }
    checkOptions("new Forge({ defaults })", options.defaults);
    this.defaults = { ...options.defaults };
    this.backend =
      options.backend ?? (options.web !== undefined ? new WebBackend(options.web) : serverBackend(options));
    this.stack = new Stack(this.emitter, (ctx) => this.backend.handle(ctx));
    this.rag = new Rag(this);
  }

  /** Add middleware `async (ctx, next) => ...` around every request; before the first request only. */
  use(middleware: Middleware): this {
    this.stack.add(middleware);
    return this;
  }

  /** Listen to "request", "token", "response" or "error". */
  on<K extends EventName>(name: K, listener: Listener<EventMap[K]>): this {
    this.emitter.on(name, listener);
    return this;
  }

  /** Listen to the next event of `name` only. */
  once<K extends EventName>(name: K, listener: Listener<EventMap[K]>): this {
    this.emitter.on(name, listener, true);
    return this;
  }

  /** Stop listening: `listener`, or every listener of `name`. */
  off<K extends EventName>(name: K, listener?: Listener<EventMap[K]>): this {
    this.emitter.off(name, listener);
    return this;
  }

  /** The completion of `prompt`; with `schema`, the reply parsed; a list of prompts gives a list. */
  generate(prompt: string, options: RequestOptions & { schema: JsonSchema }): Promise<unknown>;
  generate(prompt: string, options?: RequestOptions): Promise<string>;
  generate(prompts: string[], options?: RequestOptions): Promise<unknown[]>;
  async generate(prompt: string | string[], options: RequestOptions = {}): Promise<unknown> {
    if (Array.isArray(prompt)) {
      if (!prompt.length) throw new ConfigError("app.generate([]) needs at least one prompt", { field: "prompt" });
      return Promise.all(prompt.map((p) => this.generate(p, options)));
    }
    const ctx = this.request({ prompt }, options);
    return parsed(ctx, await this.handle(ctx));
  }

  /** The completion of `prompt`, piece by piece; leaving the loop early cancels it. */
  stream(prompt: string, options: RequestOptions = {}): AsyncGenerator<string> {
    return this.handleStream(this.request({ prompt }, options, true));
  }

  /** The assistant's reply to `messages` (or to one user message); with `schema`, parsed. */
  chat(messages: Messages, options: RequestOptions & { schema: JsonSchema }): Promise<unknown>;
  chat(messages: Messages, options?: RequestOptions): Promise<string>;
  async chat(messages: Messages, options: RequestOptions = {}): Promise<unknown> {
    const ctx = this.request({ messages }, options);
    return parsed(ctx, await this.handle(ctx));
  }

  /** The assistant's reply, piece by piece. */
  chatStream(messages: Messages, options: RequestOptions = {}): AsyncGenerator<string> {
    return this.handleStream(this.request({ messages }, options, true));
  }

  /** One vector per text (the server's /v1/embeddings). */
  async embed(texts: string | string[], options: CallOptions = {}): Promise<number[][]> {
    const batch = typeof texts === "string" ? [texts] : texts;
    if (!Array.isArray(batch) || !batch.length || !batch.every((t) => typeof t === "string")) {
      throw new ConfigError(`app.embed() needs a string or a non-empty list of strings, got ${preview(texts)}`, {
        field: "texts",
      });
    }
    return this.backend.embed(batch, options);
  }

  /** The ids of the models the backend serves. */
  models(options: CallOptions = {}): Promise<string[]> {
    return this.backend.models(options);
  }

  /**
   * A request for `handle` / `handleStream`: a prompt, or chat messages, with options over the app's
   * defaults. After handling, `ctx.completion` has the finish reason, token counts, tool calls and sources.
   */
  request(input: { prompt?: string; messages?: Messages }, options: RequestOptions = {}, stream = false): Context {
    checkOptions("the request", options);
    const { signal, meta, id, ...rest } = options;
    const params: Params = { ...this.defaults, ...rest };
    if (input.messages !== undefined) {
      return new Context({ messages: messagesOf(input.messages), params, stream, signal, meta, id });
    }
    if (typeof input.prompt !== "string") {
      throw new ConfigError(`the prompt must be a string, got ${preview(input.prompt)}`, { field: "prompt" });
    }
    return new Context({ prompt: input.prompt, params, stream, signal, meta, id });
  }

  /** Run a request (from `request`) through the middleware stack; the reply's text. */
  handle(ctx: Context): Promise<string> {
    return this.stack.handle(ctx);
  }

  /** Run a streaming request (from `request(..., true)`) through the middleware stack; its pieces. */
  handleStream(ctx: Context): AsyncGenerator<string> {
    return this.stack.handleStream(ctx);
  }
}

function serverBackend(options: ForgeOptions): ServerBackend {
  const baseURL = options.baseURL ?? env("FORGE_BASE_URL") ?? DEFAULT_BASE_URL;
  if (typeof baseURL !== "string" || !/^https?:\/\/[^/]/.test(baseURL)) {
    throw ConfigError.forField("Forge", "baseURL", baseURL, "must be an http(s) URL such as http://127.0.0.1:8000");
  }
  const timeout = options.timeout;
  if (timeout !== undefined && !(typeof timeout === "number" && timeout > 0)) {
    throw ConfigError.forField("Forge", "timeout", timeout, "must be a number of seconds > 0");
  }
  const { apiKey = env("FORGE_API_KEY"), model, fetch, headers } = options;
  return new ServerBackend({ baseURL, apiKey, model, timeout, fetch, headers });
}

function env(name: string): string | undefined {
  const proc = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process;
  return proc?.env?.[name] || undefined;
}

function messagesOf(messages: Messages): ChatMessage[] {
  if (typeof messages === "string") return [{ role: "user", content: messages }];
  const ok = (m: unknown): boolean =>
    typeof m === "object" && m !== null && typeof (m as ChatMessage).role === "string";
  if (!Array.isArray(messages) || !messages.length || !messages.every(ok)) {
    throw new ConfigError(
      `messages must be a string or a non-empty list of { role, content } objects, got ${preview(messages)}`,
      { field: "messages" },
    );
  }
  return messages.map((m) => ({ ...m }));
}

/** The reply parsed, when the request gave a schema. */
function parsed(ctx: Context, text: string): unknown {
  if (ctx.params.schema === undefined) return text;
  try {
    return JSON.parse(text);
  } catch {
    const reason = ctx.completion?.finishReason ?? "unknown";
    throw new ForgeError(
      `the reply is not complete JSON for the schema (finish reason: ${reason}): ${preview(text, 80)}; ` +
        "raise maxTokens if it was cut short",
    );
  }
}
