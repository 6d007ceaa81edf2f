/**
 * RAG over the server's store (`forge serve MODEL --db DB`): `app.rag.query` searches it
 * (POST /v1/rag/query), `app.rag.answer` asks a chat the server grounds in it (the reply quotes
 * and cites the sources it returns).
 */

import type { RagQueryOptions } from "./backend.js";
import { ConfigError, ForgeError, preview } from "./errors.js";
import type { Forge } from "./forge.js";
import type { RequestOptions, Source } from "./types.js";

export interface RagAnswer {
  /** The reply: in the server's default "quote" mode, a quote of a source and its [n], or "not in the sources". */
  answer: string;
  /** The passages the answer may cite, numbered as it cites them. */
  sources: Source[];
  finishReason: string | null;
}

export class Rag {
  constructor(private readonly app: Forge) {}

  /** The `k` chunks of the store closest to `question`, best first, with their scores. */
  async query(question: string, options: RagQueryOptions = {}): Promise<Source[]> {
    checkQuestion("app.rag.query", question);
    const { k } = options;
    if (k !== undefined && !(Number.isInteger(k) && k >= 1)) {
      throw ConfigError.forField("rag.query", "k", k, "must be an integer >= 1");
    }
    return this.app.backend.ragQuery(question, options);
  }

  /** The answer to `question` from the store, through the app's middleware, with its sources. */
  async answer(question: string, options: RequestOptions = {}): Promise<RagAnswer> {
    checkQuestion("app.rag.answer", question);
    const ctx = this.app.request({ messages: [{ role: "user", content: question }] }, options);
    const answer = await this.app.handle(ctx);
    const sources = ctx.completion?.sources;
    if (!sources) {
      throw new ForgeError(
        `${this.app.backend.name} answered without sources: it has no RAG store; ` +
          "start it with `forge serve MODEL --db DB` (a store made by `forge rag add PATHS --db DB`)",
      );
    }
    return { answer, sources, finishReason: ctx.completion?.finishReason ?? null };
  }
}

function checkQuestion(call: string, question: unknown): void {
  if (typeof question !== "string" || !question.trim()) {
    throw new ConfigError(`${call}(question) needs a non-empty string, got ${preview(question)}`, {
      field: "question",
    });
  }
}
