/**
 * What runs the model under the middleware stack: a `Backend`.
 *
 * `ServerBackend` (server.ts) talks to `forge serve` over HTTP. A backend that runs a
 * `forge export --format web` folder in the page implements the same interface, and
 * `new Forge({ backend })` takes any implementation, so the app, its middleware, events,
 * RAG and agents work the same over either.
 */

import type { Context } from "./context.js";
import type { Source } from "./types.js";

export interface CallOptions {
  signal?: AbortSignal;
}

export interface RagQueryOptions extends CallOptions {
  /** How many chunks (the server's default: 5). */
  k?: number;
  /** Metadata key -> a value, or a list of the values allowed. */
  filter?: Record<string, string | number | boolean | null | (string | number | boolean | null)[]>;
}

export interface Backend {
  /** What it runs on, for messages: "http://127.0.0.1:8000", "./smol-web/". */
  readonly name: string;
  /**
   * The innermost handler: answer `ctx`. A non-streaming request gets `ctx.response` and
   * `ctx.completion`; a streaming one gets `ctx.chunks`, whose end sets `ctx.completion`.
   * Failures are ForgeErrors; `ctx.signal` cancels.
   */
  handle(ctx: Context): Promise<void>;
  /** One vector per text. */
  embed(texts: string[], options?: CallOptions): Promise<number[][]>;
  /** The best chunks of the RAG store for `question`, scored. */
  ragQuery(question: string, options?: RagQueryOptions): Promise<Source[]>;
  /** The ids of the models it serves. */
  models(options?: CallOptions): Promise<string[]>;
}
