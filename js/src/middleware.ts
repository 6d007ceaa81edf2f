/**
 * The built-in middleware, as Python's forge.middleware has them: logger(), timer(), cache(),
 * and retry() for a client, which meets busy servers and dropped connections.
 *
 *     app.use(logger()).use(timer()).use(retry()).use(cache());
 */

import { type Context, type Middleware, type Next, tap } from "./context.js";
import { AbortError, ApiError, ConfigError, ConnectionError, RateLimitError } from "./errors.js";
import { seconds } from "./stack.js";
import type { Completion } from "./types.js";

/** One line per request: id, prompt preview, characters out, finish reason, time; failures too. */
export function logger(
  log: (line: string) => void = (line) => console.error(line),
  { preview = 40 }: { preview?: number } = {},
): Middleware {
  const head = (ctx: Context): string => {
    const prompt = ctx.prompt ?? ctx.messages?.at(-1)?.content ?? "";
    const shown = prompt.length <= preview ? prompt : `${prompt.slice(0, preview)}…`;
    return `${ctx.id} ${ctx.stream ? "stream" : ctx.kind === "chat" ? "chat" : "generate"} ${JSON.stringify(shown)}`;
  };
  const ms = (start: number): string => `${Math.round((seconds() - start) * 1000)} ms`;
  const line = (ctx: Context, text: string, start: number): string => {
    const reason = ctx.completion?.finishReason ?? (ctx.cached ? "cached" : "-");
    return `${head(ctx)} -> ${text.length} chars (${reason}) in ${ms(start)}`;
  };
  const failure = (ctx: Context, text: string, error: unknown, start: number): string => {
    const what = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
    return `${head(ctx)} failed after ${text.length} chars in ${ms(start)}: ${what}`;
  };
  return async function logger(ctx: Context, next: Next): Promise<void> {
    const start = seconds();
    try {
      await next();
    } catch (error) {
      log(failure(ctx, "", error, start));
      throw error;
    }
    if (ctx.stream && ctx.chunks !== null) {
      ctx.chunks = tap(
        ctx.chunks,
        (text) => log(line(ctx, text, start)),
        (text, error) => log(failure(ctx, text, error, start)),
      );
    } else {
      log(line(ctx, ctx.response ?? "", start));
    }
  };
}

/** `ctx.timings.total` and, when streaming, `ctx.timings.firstToken`, in seconds. */
export function timer(): Middleware {
  return async function timer(ctx: Context, next: Next): Promise<void> {
    const start = seconds();
    await next();
    if (!ctx.stream || ctx.chunks === null) {
      ctx.timings["total"] = seconds() - start;
      return;
    }
    const chunks = ctx.chunks;
    ctx.chunks = (async function* timed() {
      for await (const piece of chunks) {
        ctx.timings["firstToken"] ??= seconds() - start;
        yield piece;
      }
      ctx.timings["total"] = seconds() - start;
    })();
  };
}

export interface RetryOptions {
  /** Attempts after the first (default 2). */
  retries?: number;
  /** Seconds before the first retry, doubled for each next one (default 0.5), unless the server says when. */
  delay?: number;
  /** The longest wait between attempts, in seconds (default 8). */
  maxDelay?: number;
  /** HTTP statuses worth another try (default 408, 429, 500, 502, 503, 504); connection errors always are. */
  statuses?: number[];
  /** Told before each retry. */
  onRetry?: (info: { ctx: Context; error: unknown; attempt: number; delay: number }) => void;
}

/**
 * Try the rest of the stack again when the server is busy (429, honouring Retry-After), failed (5xx) or
 * could not be reached. A stream is retried only until its first piece; an aborted request never is.
 */
export function retry(options: RetryOptions = {}): Middleware {
  const { retries = 2, delay = 0.5, maxDelay = 8, onRetry } = options;
  const statuses = new Set(options.statuses ?? [408, 429, 500, 502, 503, 504]);
  if (!Number.isInteger(retries) || retries < 0) {
    throw ConfigError.forField("retry()", "retries", retries, "must be an integer >= 0");
  }
  if (!(delay >= 0) || !(maxDelay >= delay)) {
    throw ConfigError.forField("retry()", "delay", delay, `must be >= 0 and at most maxDelay (${maxDelay})`);
  }
  const worth = (error: unknown): boolean =>
    !(error instanceof AbortError) &&
    (error instanceof ConnectionError || (error instanceof ApiError && statuses.has(error.status ?? 0)));
  return async function retry(ctx: Context, next: Next): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      try {
        await next();
        return;
      } catch (error) {
        if (attempt > retries || !worth(error) || ctx.signal?.aborted) throw error;
        const asked = error instanceof RateLimitError ? error.retryAfter : null;
        const wait = Math.min(maxDelay, asked ?? delay * 2 ** (attempt - 1));
        onRetry?.({ ctx, error, attempt, delay: wait });
        await sleep(wait, ctx.signal);
      }
    }
  };
}

function sleep(secs: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    const done = (): void => {
      signal?.removeEventListener("abort", stop);
      resolve();
    };
    const timer = setTimeout(done, secs * 1000);
    const stop = (): void => {
      clearTimeout(timer);
      reject(new AbortError());
    };
    signal?.addEventListener("abort", stop, { once: true });
  });
}

export interface CacheMiddleware extends Middleware {
  /** Key -> the cached answer, least recently used first. */
  readonly entries: Map<string, { text: string; completion: Completion | null }>;
}

/**
 * An LRU cache keyed on the prompt (or messages) and every option. A hit short-circuits the stack
 * (`ctx.cached = true`); a stream is cached once it has run to its end.
 */
export function cache({ maxEntries = 256 }: { maxEntries?: number } = {}): CacheMiddleware {
  if (!Number.isInteger(maxEntries) || maxEntries < 1) {
    throw ConfigError.forField("cache()", "maxEntries", maxEntries, "must keep at least 1 entry");
  }
  const entries = new Map<string, { text: string; completion: Completion | null }>();
  const store = (key: string, text: string, completion: Completion | null): void => {
    entries.delete(key);
    entries.set(key, { text, completion });
    while (entries.size > maxEntries) entries.delete(entries.keys().next().value as string);
  };
  const mw = async function cache(ctx: Context, next: Next): Promise<void> {
    const key = JSON.stringify([ctx.kind, ctx.prompt, ctx.messages, ctx.params]);
    const hit = entries.get(key);
    if (hit !== undefined) {
      store(key, hit.text, hit.completion); // most recently used now
      ctx.cached = true;
      ctx.completion = hit.completion;
      ctx.setText(hit.text);
      return;
    }
    await next();
    if (ctx.stream && ctx.chunks !== null) {
      ctx.chunks = tap(ctx.chunks, (text) => store(key, text, ctx.completion));
    } else if (ctx.response !== null) {
      store(key, ctx.response, ctx.completion);
    }
  };
  return Object.assign(mw, { entries });
}
