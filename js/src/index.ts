/**
 * forge-llm: Forge's Express-style API in JavaScript, over `forge serve` or a web export in the page.
 *
 *     import { Forge, logger } from "forge-llm";
 *     const app = new Forge({ baseURL: "http://127.0.0.1:8000" }).use(logger());
 *     console.log(await app.generate("Once upon a time", { maxTokens: 32 }));
 */

export { Agent, FINAL, type AgentOptions, type AgentResult, type Reason } from "./agent.js";
export type { Backend, CallOptions, RagQueryOptions } from "./backend.js";
export { Context, compose, type Middleware, type Next } from "./context.js";
export {
  AbortError,
  AgentError,
  ApiError,
  AuthenticationError,
  BadRequestError,
  ConfigError,
  ConnectionError,
  ContextLengthError,
  ForgeError,
  NotFoundError,
  RateLimitError,
  ServerError,
  ToolError,
} from "./errors.js";
export {
  EVENT_NAMES,
  type ErrorEvent,
  type EventMap,
  type EventName,
  type Listener,
  type RequestEvent,
  type ResponseEvent,
  type TokenEvent,
} from "./events.js";
export { DEFAULT_BASE_URL, Forge, type ForgeOptions } from "./forge.js";
export { cache, logger, retry, timer, type CacheMiddleware, type RetryOptions } from "./middleware.js";
export { Rag, type RagAnswer } from "./rag.js";
export { ServerBackend, type ServerOptions } from "./server.js";
export { WebBackend, type WebGenerateOptions, type WebOptions, type WebRuntime } from "./web.js";
export {
  tool,
  type AgentEvent,
  type AgentFailureEvent,
  type AgentTokenEvent,
  type FinalEvent,
  type Tool,
  type ToolCallEvent,
  type ToolResultEvent,
} from "./tools.js";
export type {
  ChatMessage,
  Completion,
  GenerationOptions,
  JsonSchema,
  Params,
  RequestOptions,
  Source,
  ToolCall,
  ToolDefinition,
} from "./types.js";
