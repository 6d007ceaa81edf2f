/**
 * The app's events and their typed payloads, as Python's forge.events names them:
 * "request" (a request enters the middleware stack), "token" (a streamed piece),
 * "response" (a request is answered) and "error" (a request or a listener failed).
 */

import { ConfigError, preview } from "./errors.js";
import type { ChatMessage, Params } from "./types.js";

export interface RequestEvent {
  name: "request";
  id: string;
  prompt: string | null;
  messages: ChatMessage[] | null;
  stream: boolean;
  params: Params;
}

export interface TokenEvent {
  name: "token";
  id: string;
  /** The piece's position in the stream, from 0. */
  index: number;
  text: string;
}

export interface ResponseEvent {
  name: "response";
  id: string;
  text: string;
  finishReason: string | null;
  promptTokens: number | null;
  completionTokens: number | null;
  /** Seconds from the request to its last piece. */
  elapsed: number;
  cached: boolean;
}

export interface ErrorEvent {
  name: "error";
  /** The request that failed; null when a listener failed. */
  id: string | null;
  error: unknown;
  source: "request" | "listener";
}

/** Event name -> its payload. */
export interface EventMap {
  request: RequestEvent;
  token: TokenEvent;
  response: ResponseEvent;
  error: ErrorEvent;
}

export type EventName = keyof EventMap;
export type Listener<E> = (event: E) => unknown;

export const EVENT_NAMES: readonly EventName[] = ["request", "token", "response", "error"];

/** Listeners by event name. A listener that throws (or rejects) becomes an "error" event, never the request's. */
export class Emitter {
  private readonly listeners = new Map<EventName, { fn: Listener<never>; once: boolean }[]>();

  on<K extends EventName>(name: K, fn: Listener<EventMap[K]>, once = false): void {
    check(name, fn);
    const list = this.listeners.get(name) ?? [];
    list.push({ fn: fn as Listener<never>, once });
    this.listeners.set(name, list);
  }

  /** Remove `fn`, or every listener of `name` when `fn` is omitted. */
  off<K extends EventName>(name: K, fn?: Listener<EventMap[K]>): void {
    check(name, fn ?? (() => undefined));
    if (fn === undefined) {
      this.listeners.delete(name);
      return;
    }
    const list = this.listeners.get(name) ?? [];
    const at = list.findIndex((entry) => entry.fn === fn);
    if (at >= 0) list.splice(at, 1);
  }

  emit<K extends EventName>(name: K, event: EventMap[K]): void {
    const list = this.listeners.get(name);
    if (!list?.length) return;
    for (const entry of [...list]) {
      if (entry.once) this.off(name, entry.fn as Listener<EventMap[K]>);
      try {
        const out = (entry.fn as Listener<EventMap[K]>)(event);
        if (out instanceof Promise) out.catch((error: unknown) => this.failed(name, error));
      } catch (error) {
        this.failed(name, error);
      }
    }
  }

  private failed(name: EventName, error: unknown): void {
    if (name === "error") {
      console.error("forge: an 'error' listener failed:", error); // nowhere else to report it
      return;
    }
    this.emit("error", { name: "error", id: null, error, source: "listener" });
  }
}

function check(name: string, fn: unknown): void {
  if (!(EVENT_NAMES as readonly string[]).includes(name)) {
    throw new ConfigError(`no event ${preview(name)}; the app's events are ${EVENT_NAMES.join(", ")}`, {
      field: "name",
    });
  }
  if (typeof fn !== "function") {
    throw new ConfigError(`a listener of ${JSON.stringify(name)} must be a function, got ${preview(fn)}`);
  }
}
