/**
 * `WebBackend`: run a `forge export --format web` folder in the page, no server at all.
 *
 *     const app = new Forge({ web: "./smol-web/" });   // the folder, relative to the page
 *     for await (const piece of app.stream("Once upon a time", { maxTokens: 32 })) out.append(piece);
 *
 * It imports the folder's own runtime (`forge-web.js`, written by the export) and delegates to it, so
 * the page and the package run one implementation: WebGPU when the browser has an adapter, WASM
 * otherwise, the KV cache, greedy and seeded sampling. Middleware, events and streaming work as over
 * a server; what needs a server (embeddings, RAG, tools, schemas) is a ConfigError saying so.
 */

import type { Backend, CallOptions, RagQueryOptions } from "./backend.js";
import type { Context } from "./context.js";
import { AbortError, ConfigError, ForgeError, preview } from "./errors.js";
import type { ChatMessage, Completion, Source } from "./types.js";

/** What `forge-web.js`'s `load()` returns (the part this backend uses). */
export interface WebRuntime {
  readonly provider: "webgpu" | "wasm";
  readonly fallback: string | null;
  readonly manifest: { name: string; dtype: string; context_length: number };
  encode(text: string): number[];
  encodePrompt(text: string): number[];
  renderChat(messages: { role: string; content: string }[]): string;
  streamIds(ids: number[], options: WebGenerateOptions): AsyncIterable<string>;
  complete(ids: number[], options?: WebGenerateOptions): Promise<number[]>;
  topTokens(ids: number[]): Promise<number[]>;
}

export interface WebGenerateOptions {
  maxTokens?: number;
  temperature?: number;
  topP?: number;
  seed?: number;
  stop?: string | string[];
  signal?: AbortSignal;
  onFinish?: (info: { finishReason: string; promptTokens: number; completionTokens: number }) => void;
}

export interface WebOptions {
  /** "auto" (WebGPU when the browser has a hardware adapter, else WASM: a software one is slower), "webgpu" or "wasm". */
  provider?: "auto" | "webgpu" | "wasm";
}

/** The generation options the web runtime has; any other is refused rather than ignored. */
const SUPPORTED = new Set(["maxTokens", "temperature", "topP", "seed", "stop"]);

export class WebBackend implements Backend {
  readonly name: string;
  private readonly base: string;
  private readonly options: WebOptions;
  private loading: Promise<WebRuntime> | null = null;

  constructor(folder: string, options: WebOptions = {}) {
    if (typeof folder !== "string" || !folder) {
      throw ConfigError.forField("Forge", "web", folder, 'must be the URL of a web folder, such as "./smol-web/"');
    }
    this.name = folder;
    const page = (globalThis as { location?: { href: string } }).location?.href;
    try {
      this.base = new URL(folder.endsWith("/") ? folder : `${folder}/`, page).href;
    } catch {
      throw ConfigError.forField(
        "Forge",
        "web",
        folder,
        "must be the URL of a `forge export --format web` folder: relative to the page in a browser, " +
          "absolute (http://...) elsewhere",
      );
    }
    this.options = options;
  }

  /** The folder's runtime, loaded on first use (the model file downloads then). */
  runtime(): Promise<WebRuntime> {
    this.loading ??= this.load();
    return this.loading;
  }

  private async load(): Promise<WebRuntime> {
    let module: { load: (base: string, options: WebOptions) => Promise<WebRuntime> };
    try {
      module = (await import(/* webpackIgnore: true */ `${this.base}forge-web.js`)) as typeof module;
    } catch (error) {
      this.loading = null;
      throw new ConfigError(
        `cannot load ${this.base}forge-web.js (${error instanceof Error ? error.message : String(error)}); ` +
          "web must name a folder made by `forge export MODEL --format web`, served over http(s)",
        { field: "web", cause: error },
      );
    }
    return module.load(this.base, this.options);
  }

  async handle(ctx: Context): Promise<void> {
    const unsupported = Object.keys(ctx.params).filter(
      (k) => !SUPPORTED.has(k) && (ctx.params as Record<string, unknown>)[k] !== undefined,
    );
    if (unsupported.length) {
      throw new ConfigError(
        `the web backend (${this.name}) runs generation options ${[...SUPPORTED].join(", ")} only, not ` +
          `${unsupported.join(", ")}; use a Forge server ({ baseURL }) for those`,
        { field: unsupported[0] },
      );
    }
    const runtime = await this.runtime();
    const ids =
      ctx.messages !== null
        ? runtime.encode(runtime.renderChat(plain(ctx.messages)))
        : runtime.encodePrompt(ctx.prompt ?? "");
    const { maxTokens, temperature, topP, seed, stop } = ctx.params;
    const completion: Completion = {
      finishReason: null,
      promptTokens: ids.length,
      completionTokens: null,
      toolCalls: [],
      sources: null,
      model: runtime.manifest.name,
    };
    const onFinish: WebGenerateOptions["onFinish"] = (info) => {
      completion.finishReason = info.finishReason;
      completion.completionTokens = info.completionTokens;
    };
    const options: WebGenerateOptions = { maxTokens, temperature, topP, seed, stop, signal: ctx.signal, onFinish };
    const pieces = this.pieces(runtime.streamIds(ids, options), ctx, completion);
    if (ctx.stream) {
      ctx.chunks = pieces;
      return;
    }
    let text = "";
    for await (const piece of pieces) text += piece;
    ctx.response = text;
  }

  private async *pieces(source: AsyncIterable<string>, ctx: Context, completion: Completion): AsyncGenerator<string> {
    for await (const piece of source) yield piece;
    if (ctx.signal?.aborted) throw new AbortError();
    ctx.completion = completion;
  }

  async embed(texts: string[], _options?: CallOptions): Promise<number[][]> {
    throw new ConfigError(
      `app.embed(${preview(texts)}) needs a Forge server: the web backend (${this.name}) runs a language model only`,
    );
  }

  async ragQuery(question: string, _options?: RagQueryOptions): Promise<Source[]> {
    throw new ConfigError(
      `app.rag.query(${preview(question)}) needs a Forge server with a RAG store (forge serve MODEL --db DB); ` +
        `the web backend (${this.name}) has none`,
    );
  }

  async models(_options?: CallOptions): Promise<string[]> {
    return [(await this.runtime()).manifest.name];
  }
}

function plain(messages: ChatMessage[]): { role: string; content: string }[] {
  return messages.map((m) => {
    if (m.tool_calls?.length || m.role === "tool") {
      throw new ForgeError("the web backend runs no tools: a chat with tool calls needs a Forge server");
    }
    return { role: m.role, content: m.content ?? "" };
  });
}
