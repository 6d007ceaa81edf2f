// The Forge class against a real `forge serve` of a tiny model trained for the tests (with a RAG store):
// generate, stream, events, middleware, embeddings, errors, abort, RAG.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  AbortError,
  AuthenticationError,
  BadRequestError,
  ConfigError,
  ConnectionError,
  ContextLengthError,
  Forge,
  ServerError,
  cache,
  logger,
  retry,
  timer,
} from "forge-llm";

import { freePort, metric, metrics, servers, waitFor } from "./servers.js";

const { tiny } = servers();
const skip = tiny ? false : "no tiny server: run the tests with npm test";
const app = (options = {}) => new Forge({ baseURL: tiny.url, apiKey: tiny.apiKey, ...options });
/** Sampled, seeded: varied text, the same every time. */
const SAMPLED = { temperature: 1, seed: 3, maxTokens: 24 };

async function collect(pieces) {
  const out = [];
  for await (const piece of pieces) out.push(piece);
  return out;
}

describe("generate and stream", { skip }, () => {
  test("a stream's pieces join to the same completion, and events come in order", async () => {
    const seen = [];
    const forge = app()
      .on("request", (e) => seen.push(`request ${e.stream ? "stream" : "generate"}`))
      .on("token", (e) => seen.push(`token ${e.index}`))
      .on("response", (e) => seen.push(`response ${e.finishReason} ${e.completionTokens}`));
    const text = await forge.generate("To be, or not", SAMPLED);
    assert.deepEqual(seen, ["request generate", "response length 24"]);
    seen.length = 0;
    const pieces = await collect(forge.stream("To be, or not", SAMPLED));
    assert.ok(pieces.length > 1, `one piece only: ${JSON.stringify(pieces)}`);
    assert.equal(pieces.join(""), text);
    assert.deepEqual(seen, ["request stream", ...pieces.map((_, i) => `token ${i}`), "response length 24"]);
  });

  test("a list of prompts gives a list, and the app's defaults apply under each request's options", async () => {
    const forge = app({ defaults: SAMPLED });
    const [a, b] = await forge.generate(["To be", "To be"]);
    assert.equal(a, b);
    assert.equal(a, await app().generate("To be", SAMPLED));
    assert.notEqual(await forge.generate("To be", { seed: 4 }), a);
  });

  test("request() and handle() expose the completion: finish reason and token counts", async () => {
    const forge = app();
    const ctx = forge.request({ prompt: "To be" }, { ...SAMPLED, maxTokens: 5 });
    const text = await forge.handle(ctx);
    assert.equal(ctx.response, text);
    assert.equal(ctx.completion.finishReason, "length");
    assert.equal(ctx.completion.completionTokens, 5);
    assert.ok(ctx.completion.promptTokens >= 1);
    assert.deepEqual(await forge.models(), [ctx.completion.model]);
  });
});

describe("middleware", { skip }, () => {
  test("runs in onion order around the request, and is frozen at the first request", async () => {
    const order = [];
    const mark = (name) =>
      Object.defineProperty(
        async (ctx, next) => {
          order.push(`${name} in`);
          await next();
          order.push(`${name} out`);
        },
        "name",
        { value: name },
      );
    const forge = app().use(mark("a")).use(mark("b"));
    forge.on("request", () => order.push("request")).on("response", () => order.push("response"));
    forge.on("token", () => order.includes("token") || order.push("token"));
    await collect(forge.stream("To be", SAMPLED));
    assert.deepEqual(order, ["request", "a in", "b in", "b out", "a out", "token", "response"]);
    assert.throws(
      () => forge.use(mark("c")),
      (e) => e instanceof ConfigError && /first request/.test(e.message),
    );
  });

  test("a middleware may change the request and the answer", async () => {
    const forge = app().use(async (ctx, next) => {
      ctx.params = { ...ctx.params, maxTokens: 3 };
      await next();
      ctx.response = ctx.response.toUpperCase();
    });
    const ctx = forge.request({ prompt: "To be" }, SAMPLED);
    const text = await forge.handle(ctx);
    assert.equal(ctx.completion.completionTokens, 3);
    assert.equal(text, text.toUpperCase());
  });

  test("cache() answers a repeated request without the server, streamed or not", async () => {
    const reached = [];
    const store = cache({ maxEntries: 2 });
    const forge = app()
      .use(store)
      .use(async (ctx, next) => {
        reached.push(ctx.id);
        await next();
      });
    const cached = [];
    forge.on("response", (e) => cached.push(e.cached));
    const first = await forge.generate("To be", SAMPLED);
    assert.equal(await forge.generate("To be", SAMPLED), first);
    const streamed = await collect(forge.stream("To be", { ...SAMPLED, seed: 5 })); // cached once it ends
    assert.ok(streamed.length > 1);
    assert.equal(await forge.generate("To be", { ...SAMPLED, seed: 5 }), streamed.join(""));
    assert.deepEqual(await collect(forge.stream("To be", { ...SAMPLED, seed: 5 })), [streamed.join("")]);
    assert.deepEqual(cached, [false, true, false, true, true]);
    assert.equal(reached.length, 2);
    await forge.generate("To be", { ...SAMPLED, seed: 9 }); // a third entry: the least recently used goes
    assert.equal(store.entries.size, 2);
    assert.equal(await forge.generate("To be", SAMPLED), first);
    assert.equal(reached.length, 4);
  });

  test("timer() and logger() time and log every request", async () => {
    const lines = [];
    const forge = app()
      .use(logger((line) => lines.push(line)))
      .use(timer());
    const ctx = forge.request({ prompt: "To be" }, SAMPLED, true);
    await collect(forge.handleStream(ctx));
    assert.ok(ctx.timings.firstToken > 0 && ctx.timings.firstToken <= ctx.timings.total, JSON.stringify(ctx.timings));
    await assert.rejects(forge.generate("To be", { temperature: 9 }));
    assert.match(lines[0], /^req-\w+ stream "To be" -> \d+ chars \(length\) in \d+ ms$/);
    assert.match(lines[1], /^req-\w+ generate "To be" failed after 0 chars in \d+ ms: BadRequestError: /);
  });

  test("retry() tries the rest of the stack again after a server error, and gives up in the end", async () => {
    const retries = [];
    let failures = 1;
    const flaky = async (ctx, next) => {
      if (failures-- > 0) throw new ServerError("the server is restarting", { status: 503 });
      await next();
    };
    const forge = app()
      .use(retry({ delay: 0.01, onRetry: (info) => retries.push([info.attempt, info.error.status]) }))
      .use(flaky);
    assert.equal(await forge.generate("To be", SAMPLED), await app().generate("To be", SAMPLED));
    assert.deepEqual(retries, [[1, 503]]);

    const nowhere = new Forge({ baseURL: `http://127.0.0.1:${await freePort()}` });
    const attempts = [];
    nowhere.use(retry({ retries: 2, delay: 0.01, onRetry: (info) => attempts.push(info.attempt) }));
    await assert.rejects(
      nowhere.generate("To be"),
      (e) => e instanceof ConnectionError && /forge serve/.test(e.message),
    );
    assert.deepEqual(attempts, [1, 2]);
    const bad = app().use(retry({ onRetry: () => attempts.push("again") }));
    await assert.rejects(bad.generate("To be", { temperature: 9 }), BadRequestError); // a 400 is not retried
    assert.deepEqual(attempts, [1, 2]);
  });
});

describe("errors", { skip }, () => {
  test("a wrong or missing API key is an AuthenticationError (401)", async () => {
    for (const apiKey of ["sk-wrong", undefined]) {
      const forge = new Forge({ baseURL: tiny.url, ...(apiKey ? { apiKey } : {}) });
      await assert.rejects(forge.generate("To be"), (e) => {
        assert.ok(e instanceof AuthenticationError, e);
        assert.equal(e.status, 401);
        assert.equal(e.code, "invalid_api_key");
        assert.match(e.message, apiKey ? /incorrect API key/ : /missing API key/);
        return true;
      });
    }
  });

  test("a 400 keeps the server's param and message, for plain and streaming requests", async () => {
    const errors = [];
    const forge = app().on("error", (e) => errors.push(e.error));
    await assert.rejects(forge.generate("To be", { temperature: 5 }), (e) => {
      assert.ok(e instanceof BadRequestError);
      assert.equal(e.status, 400);
      assert.equal(e.param, "temperature");
      assert.match(e.message, /invalid value for 'temperature'.*\(got 5\)/);
      assert.match(e.requestId, /^req-/);
      return true;
    });
    await assert.rejects(collect(forge.stream("To be", { topP: -1 })), (e) => e.param === "top_p");
    await assert.rejects(forge.generate("To be", { maxTokens: 100_000 }), (e) => {
      assert.ok(e instanceof ContextLengthError, e);
      assert.equal(e.code, "context_length_exceeded");
      assert.equal(e.param, "max_tokens");
      return true;
    });
    assert.equal(errors.length, 3);
    assert.ok(errors.every((e) => e instanceof BadRequestError));
  });

  test("options this package does not know, and a relative web folder outside a page, are ConfigErrors", async () => {
    await assert.rejects(app().generate("To be", { max_tokens: 4 }), (e) => {
      assert.ok(e instanceof ConfigError);
      assert.equal(e.field, "max_tokens");
      assert.match(e.message, /did you mean "maxTokens"/);
      return true;
    });
    assert.throws(
      () => new Forge({ web: "./smol-web/" }),
      (e) => e instanceof ConfigError && /forge export --format web/.test(e.message),
    );
    assert.throws(
      () => new Forge({ baseURL: "localhost:8000" }),
      (e) => e.field === "baseURL",
    );
    assert.throws(() => app().on("tokens", () => {}), /no event "tokens"/);
  });
});

describe("abort", { skip }, () => {
  const cancelled = async (route) => metric(await metrics(tiny), "forge_requests_cancelled_total", { route });

  test("aborting a stream stops it, and the server sees the disconnect", async () => {
    const before = await cancelled("/v1/completions");
    const controller = new AbortController();
    const pieces = [];
    await assert.rejects(async () => {
      for await (const piece of app().stream("To be", { ...SAMPLED, maxTokens: 240, signal: controller.signal })) {
        pieces.push(piece);
        if (pieces.length === 3) controller.abort();
      }
    }, AbortError);
    assert.equal(pieces.length, 3);
    assert.ok(await waitFor(async () => (await cancelled("/v1/completions")) >= before + 1), "no cancellation");
  });

  test("leaving a stream's loop early closes the request too", async () => {
    const before = await cancelled("/v1/completions");
    for await (const piece of app().stream("To be", { ...SAMPLED, maxTokens: 240 })) if (piece) break;
    assert.ok(await waitFor(async () => (await cancelled("/v1/completions")) >= before + 1), "no cancellation");
  });

  test("aborting a plain request rejects it with AbortError, and the server stops generating", async () => {
    const before = await cancelled("/v1/completions");
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 100);
    const request = app().generate("To be", { ...SAMPLED, maxTokens: 240, signal: controller.signal });
    await assert.rejects(request, (e) => e instanceof AbortError && e.name === "AbortError");
    assert.ok(await waitFor(async () => (await cancelled("/v1/completions")) >= before + 1), "no cancellation");
    await assert.rejects(app().generate("To be", { signal: AbortSignal.abort() }), AbortError);
  });
});

describe("embeddings and RAG", { skip }, () => {
  test("embed() gives one unit vector per text", async () => {
    const [a, b, again] = await app().embed(["To be", "or not", "To be"]);
    assert.equal(a.length, 128); // the tiny preset's width
    assert.ok(Math.abs(Math.hypot(...a) - 1) < 1e-3);
    assert.notDeepEqual(a, b);
    assert.ok(a.every((x, i) => Math.abs(x - again[i]) < 1e-5));
    assert.equal((await app().embed("To be")).length, 1);
  });

  test("rag.query() finds the right note, scored, and filters on metadata", async () => {
    const hits = await app().rag.query("when does the rocket launch?", { k: 2 });
    assert.equal(hits.length, 2);
    assert.ok(hits[0].source.endsWith("launch.md") && hits[0].text.includes("March 14"), JSON.stringify(hits));
    assert.ok(hits[0].score > hits[1].score);
    const menus = await app().rag.query("when does the rocket launch?", { k: 2, filter: { kind: "txt" } });
    assert.deepEqual(
      menus.map((h) => h.source.split("/").at(-1)),
      ["menu.txt"],
    );
    await assert.rejects(app().rag.query("x", { filter: { kind: { nested: 1 } } }), (e) => e.param === "filter");
    await assert.rejects(app().rag.query("x", { k: 0 }), ConfigError);
  });

  test("rag.answer() quotes a source and cites it, or says the sources lack the answer", async () => {
    const { answer, sources } = await app().rag.answer("When is the launch?", { maxTokens: 64 });
    assert.ok(sources[0].source.endsWith("launch.md"));
    const quoted = answer.match(/^"(.+)" \[(\d+)\]$/s);
    if (answer !== "The sources do not contain the answer.") {
      assert.ok(quoted, `neither a cited quote nor "not found": ${answer}`);
      assert.ok(sources[Number(quoted[2]) - 1].text.includes(quoted[1]));
    }
  });
});
