/**
 * The ForgeError tree: every error this package throws for something the caller can fix.
 *
 *     ForgeError                      status?  code?  param?
 *     ├── ConfigError                 a bad option given to this package (no request was made); `field`
 *     ├── ConnectionError             the server could not be reached, or it timed out
 *     ├── AbortError                  the request's AbortSignal fired (name "AbortError", as fetch's)
 *     ├── ApiError                    the server refused the request: its status, code, param and message
 *     │   ├── BadRequestError         400: `param` names the request field at fault
 *     │   │   └── ContextLengthError  400: code "context_length_exceeded"
 *     │   ├── AuthenticationError     401: a missing or wrong API key
 *     │   ├── NotFoundError           404: no such route, model, or RAG store
 *     │   ├── RateLimitError          429: the server's queue is full; `retryAfter` seconds
 *     │   └── ServerError             5xx: a fault of the server itself
 *     ├── ToolError                   an agent tool that is badly defined, threw, or ran past its time
 *     └── AgentError                  an agent run whose model failed
 *
 * An ApiError keeps the server's OpenAI-style error body (`{"error": {message, type, param, code}}`):
 * `message`, `type`, `param` and `code` are the server's own, `status` is the HTTP status.
 */

/** The fields of an error, as the server sent them. */
export interface ErrorDetails {
  status?: number;
  code?: string | null;
  param?: string | null;
  type?: string | null;
  requestId?: string | null;
  field?: string | null;
  retryAfter?: number | null;
  cause?: unknown;
}

/** Base of every error Forge throws. */
export class ForgeError extends Error {
  /** The HTTP status (undefined when no response came). */
  readonly status: number | undefined;
  /** The server's error code, e.g. "context_length_exceeded" or "invalid_api_key". */
  readonly code: string | null;
  /** The request field at fault, in the server's names, e.g. "temperature" or "messages[0].content". */
  readonly param: string | null;
  /** The server's error type, e.g. "invalid_request_error". */
  readonly type: string | null;
  /** The server's X-Request-Id, which its log lines carry. */
  readonly requestId: string | null;

  constructor(message: string, details: ErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = new.target.name;
    this.status = details.status;
    this.code = details.code ?? null;
    this.param = details.param ?? null;
    this.type = details.type ?? null;
    this.requestId = details.requestId ?? null;
  }
}

/** A bad option given to this package, found before any request was made. */
export class ConfigError extends ForgeError {
  /** The option at fault, by its JavaScript name (e.g. "maxTokens"). */
  readonly field: string | null;

  constructor(message: string, details: ErrorDetails = {}) {
    super(message, details);
    this.field = details.field ?? null;
  }

  /** `Forge.maxIterations = 0: must be a positive integer`. */
  static forField(owner: string, field: string, value: unknown, rule: string): ConfigError {
    return new ConfigError(`${owner}.${field} = ${preview(value)}: ${rule}`, { field });
  }
}

/** The server could not be reached (refused, reset, DNS) or did not answer in time. */
export class ConnectionError extends ForgeError {}

/** The request was cancelled by its AbortSignal; `name` is "AbortError", as fetch's own. */
export class AbortError extends ForgeError {
  constructor(message = "the request was aborted by its AbortSignal", details: ErrorDetails = {}) {
    super(message, details);
    this.name = "AbortError";
  }
}

/** The server refused the request; `status`, `code`, `param` and the message are the server's. */
export class ApiError extends ForgeError {}
/** 400: the request is invalid; `param` names the field. */
export class BadRequestError extends ApiError {}
/** 400 with code "context_length_exceeded": the prompt (or prompt + maxTokens) does not fit the model. */
export class ContextLengthError extends BadRequestError {}
/** 401: a missing or wrong API key (`new Forge({ apiKey })`, or FORGE_API_KEY). */
export class AuthenticationError extends ApiError {}
/** 404: no such route, model or RAG store. */
export class NotFoundError extends ApiError {}
/** 429: the server is busy; retry after `retryAfter` seconds (the retry() middleware does). */
export class RateLimitError extends ApiError {
  /** Seconds the server asked to wait (its Retry-After header), when it said. */
  readonly retryAfter: number | null;

  constructor(message: string, details: ErrorDetails = {}) {
    super(message, details);
    this.retryAfter = details.retryAfter ?? null;
  }
}
/** 5xx: a fault of the server itself; its log has the request id. */
export class ServerError extends ApiError {}

/** An agent tool that is badly defined, threw, or ran past the agent's time budget. */
export class ToolError extends ForgeError {}
/** An agent run whose model failed (the generation raised); `cause` is the error. */
export class AgentError extends ForgeError {}

/** The ApiError class for an HTTP status and error code. */
export function apiErrorClass(status: number, code: string | null): typeof ApiError {
  if (status === 400) return code === "context_length_exceeded" ? ContextLengthError : BadRequestError;
  if (status === 401) return AuthenticationError;
  if (status === 404) return NotFoundError;
  if (status === 429) return RateLimitError;
  if (status >= 500) return ServerError;
  return ApiError;
}

/** The ApiError for a server's error body (`{"error": {...}}` or the inner object) and status. */
export function apiError(status: number, body: unknown, headers?: Headers | null, cause?: unknown): ApiError {
  const inner = isRecord(body) && isRecord(body["error"]) ? body["error"] : isRecord(body) ? body : {};
  const text = (key: string): string | null => (typeof inner[key] === "string" ? (inner[key] as string) : null);
  const message = text("message") ?? `the server answered ${status} with no error message`;
  const code = text("code");
  const retry = Number(headers?.get("retry-after") ?? NaN);
  const Class = apiErrorClass(status, code);
  return new Class(message, {
    status,
    code,
    param: text("param"),
    type: text("type"),
    requestId: headers?.get("x-request-id") ?? null,
    retryAfter: Number.isFinite(retry) ? retry : null,
    cause,
  });
}

export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** A short, printable form of a user's value for messages. */
export function preview(value: unknown, limit = 60): string {
  let text: string;
  try {
    text = typeof value === "string" ? JSON.stringify(value) : (JSON.stringify(value) ?? String(value));
  } catch {
    text = String(value);
  }
  return text.length <= limit ? text : `${text.slice(0, limit - 3)}...`;
}
