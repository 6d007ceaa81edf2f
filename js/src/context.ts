/**
 * Koa-style middleware around every request: `async (ctx, next) => { ...; await next(); ... }`.
 *
 * Code before `await next()` sees the request (and may change `ctx.prompt`, `ctx.messages` or
 * `ctx.params`); code after it sees the answer. Not calling `next` short-circuits (a cache hit sets
 * the text with `ctx.setText` and returns). A streaming request's answer is `ctx.chunks`, an async
 * iterable of text pieces a middleware may wrap (`ctx.chunks = filter(ctx.chunks)`).
 */

import { ForgeError } from "./errors.js";
import type { ChatMessage, Completion, Params } from "./types.js";

export type Next = () => Promise<void>;
export type Middleware = (ctx: Context, next: Next) => Promise<void> | void;

let counter = 0;

/** A request id: `req-` and 12 hex digits, as Python's. */
export function newId(): string {
  const random = globalThis.crypto?.randomUUID?.().replace(/-/g, "") ?? `${Date.now().toString(16)}${counter++}`;
  return `req-${random.slice(0, 12)}`;
}

/** One request as it travels through the middleware stack; the app builds it (`app.request(...)`). */
export class Context {
  /** The request's id; the server's X-Request-Id and every event carry it. */
  id: string;
  /** The prompt of a completion (null for a chat). */
  prompt: string | null;
  /** The conversation of a chat (null for a completion). */
  messages: ChatMessage[] | null;
  /** The generation options and structure (schema, tools); replace or change them before `next()`. */
  params: Params;
  readonly stream: boolean;
  /** Cancels the request. */
  signal: AbortSignal | undefined;
  /** The full text of a non-streaming request, once answered. */
  response: string | null = null;
  /** The text pieces of a streaming request, once answered. */
  chunks: AsyncIterable<string> | null = null;
  /** Finish reason, token counts, tool calls and sources, once known (a stream: once it ends). */
  completion: Completion | null = null;
  /** Free-form data of the caller and the middleware; never sent. */
  meta: Record<string, unknown>;
  /** Seconds, by name (timer() sets "total" and "firstToken"). */
  timings: Record<string, number> = {};
  /** Whether a cache answered. */
  cached = false;

  constructor(init: {
    prompt?: string | null;
    messages?: ChatMessage[] | null;
    params?: Params;
    stream?: boolean;
    signal?: AbortSignal;
    meta?: Record<string, unknown>;
    id?: string;
  }) {
    this.id = init.id ?? newId();
    this.prompt = init.prompt ?? null;
    this.messages = init.messages ?? null;
    this.params = init.params ?? {};
    this.stream = init.stream ?? false;
    this.signal = init.signal;
    this.meta = init.meta ?? {};
  }

  /** "chat" when the request has messages, else "completion". */
  get kind(): "chat" | "completion" {
    return this.messages !== null ? "chat" : "completion";
  }

  /** Answer the request with `text`, streaming or not (used by short-circuits such as cache()). */
  setText(text: string): void {
    if (this.stream) this.chunks = onePiece(text);
    else this.response = text;
  }
}

async function* onePiece(text: string): AsyncGenerator<string> {
  if (text) yield text;
}

/**
 * Chain `middleware` around `handler` (the backend). `next()` runs the rest of the chain once; it may
 * run again only after it failed, so retry() can try the rest again.
 */
export function compose(
  middleware: readonly Middleware[],
  handler: (ctx: Context) => Promise<void>,
): (ctx: Context) => Promise<void> {
  const stack = [...middleware];
  return async function run(ctx: Context): Promise<void> {
    async function dispatch(i: number): Promise<void> {
      if (i === stack.length) return handler(ctx);
      let state: "waiting" | "running" | "failed" | "done" = "waiting";
      const next: Next = async () => {
        if (state === "running" || state === "done") {
          const name = stack[i]!.name || `middleware #${i + 1}`;
          throw new ForgeError(
            `middleware ${name} called next() again after it ${state === "done" ? "succeeded" : "began"}; ` +
              "call it once (again only after it failed, to retry)",
          );
        }
        state = "running";
        try {
          await dispatch(i + 1);
          state = "done";
        } catch (error) {
          state = "failed";
          throw error;
        }
      };
      await stack[i]!(ctx, next);
    }
    await dispatch(0);
  };
}

/** Pass `chunks` through; call `done(text)` once they have all come, `failed(text, error)` if they break. */
export async function* tap(
  chunks: AsyncIterable<string>,
  done: (text: string) => void,
  failed?: (text: string, error: unknown) => void,
): AsyncGenerator<string> {
  let text = "";
  try {
    for await (const piece of chunks) {
      text += piece;
      yield piece;
    }
  } catch (error) {
    failed?.(text, error);
    throw error;
  }
  done(text);
}
