/**
 * The middleware stack around the backend, as the app runs it: composed on the first request and
 * frozen from then on (Starlette's discipline under Koa's `use()`); every request, streamed piece,
 * failure and answer is an event for the app's listeners.
 */

import { type Context, type Middleware, compose } from "./context.js";
import { AbortError, ConfigError, preview } from "./errors.js";
import type { Emitter } from "./events.js";

export const seconds = (): number => performance.now() / 1000;

export class Stack {
  private readonly middleware: Middleware[] = [];
  private run: ((ctx: Context) => Promise<void>) | null = null;

  constructor(
    private readonly emitter: Emitter,
    private readonly handler: (ctx: Context) => Promise<void>,
  ) {}

  /** Whether the stack has served a request (and so takes no more middleware). */
  get built(): boolean {
    return this.run !== null;
  }

  add(middleware: Middleware): void {
    if (typeof middleware !== "function") {
      throw new ConfigError(`app.use() takes a function (ctx, next) => ..., got ${preview(middleware)}`);
    }
    if (this.built) {
      throw new ConfigError(
        `app.use(${middleware.name || "middleware"}) after the first request: the middleware stack is built ` +
          "then and never changes; call app.use() before the app's first request",
      );
    }
    this.middleware.push(middleware);
  }

  /** Run a non-streaming request through the stack; the answer's text. */
  async handle(ctx: Context): Promise<string> {
    const start = seconds();
    await this.enter(ctx);
    let text = ctx.response;
    if (text === null && ctx.chunks !== null) {
      text = ""; // a middleware answered with chunks
      try {
        for await (const piece of ctx.chunks) text += piece;
      } catch (error) {
        throw this.failed(ctx, error);
      }
      ctx.response = text;
    }
    this.answered(ctx, text ?? "", start);
    return text ?? "";
  }

  /** Run a streaming request through the stack; its pieces as they come. Leaving early cancels it. */
  async *handleStream(ctx: Context): AsyncGenerator<string> {
    const start = seconds();
    await this.enter(ctx);
    const chunks = ctx.chunks ?? whole(ctx.response ?? "");
    let text = "";
    let index = 0;
    try {
      for await (const piece of chunks) {
        if (ctx.signal?.aborted) throw new AbortError(); // a piece already buffered when the signal fired
        if (!piece) continue;
        this.emitter.emit("token", { name: "token", id: ctx.id, index: index++, text: piece });
        text += piece;
        yield piece;
      }
    } catch (error) {
      throw this.failed(ctx, error);
    }
    this.answered(ctx, text, start);
  }

  private async enter(ctx: Context): Promise<void> {
    this.run ??= compose(this.middleware, this.handler);
    const { id, prompt, messages, stream, params } = ctx;
    this.emitter.emit("request", { name: "request", id, prompt, messages, stream, params });
    try {
      await this.run(ctx);
    } catch (error) {
      throw this.failed(ctx, error);
    }
  }

  private failed(ctx: Context, error: unknown): unknown {
    this.emitter.emit("error", { name: "error", id: ctx.id, error, source: "request" });
    return error;
  }

  private answered(ctx: Context, text: string, start: number): void {
    const done = ctx.completion;
    this.emitter.emit("response", {
      name: "response",
      id: ctx.id,
      text,
      finishReason: done?.finishReason ?? null,
      promptTokens: done?.promptTokens ?? null,
      completionTokens: done?.completionTokens ?? null,
      elapsed: seconds() - start,
      cached: ctx.cached,
    });
  }
}

async function* whole(text: string): AsyncGenerator<string> {
  if (text) yield text;
}
