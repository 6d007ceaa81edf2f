// forge-web.js: run a `forge export --format web` folder in the browser, on onnxruntime-web.
//
//   import { load } from "./forge-web.js";
//   const forge = await load();                         // this folder; WebGPU when there is an adapter, else WASM
//   for await (const piece of forge.stream("To be", { maxTokens: 32 })) output.append(piece);
//   await forge.generate("To be", { maxTokens: 32, temperature: 0.8, seed: 1 });
//   await forge.chat([{ role: "user", content: "Hi" }]);  // a chat model (its template is in tokenizer_config.json)
//
// The model is a decoder with its KV cache as inputs and outputs (Optimum's names: past_key_values.* in,
// present.* out). web.json, written by Forge next to this file, names the model file, the tokenizer's
// bos / eos, and where onnxruntime-web is (copied into ort/ at export time, or a pinned CDN URL).
// Tokenization is @huggingface/tokenizers and chat templates @huggingface/jinja (vendor/, with their licences).

import { Tokenizer } from "./vendor/tokenizers.min.mjs";
import { Template } from "./vendor/jinja.mjs";

const fetchJSON = async (url) => {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`forge-web: fetching ${url} failed: HTTP ${response.status}`);
  return response.json();
};

/** Why WebGPU can't be used here, or null when it can (then `adapter` is set). */
async function webgpuAdapter() {
  if (typeof navigator === "undefined" || !navigator.gpu) {
    return { adapter: null, why: "this browser has no WebGPU (navigator.gpu is missing)" };
  }
  try {
    const adapter = await navigator.gpu.requestAdapter();
    if (!adapter) return { adapter: null, why: "the browser found no WebGPU adapter" };
    // A software adapter (SwiftShader: a CPU emulating a GPU) runs SmolLM2 about 20x slower than WASM does.
    if (adapter.info?.isFallbackAdapter || adapter.isFallbackAdapter) {
      return { adapter: null, why: "the browser's WebGPU adapter is a software fallback (CPU emulation), slower than WASM" };
    }
    return { adapter, why: null };
  } catch (error) {
    return { adapter: null, why: `requesting a WebGPU adapter failed: ${error}` };
  }
}

/** A seeded generator of floats in [0, 1): mulberry32, so a seed gives the same tokens on every run. */
/**
 * One turn of the event loop. A forward on the WASM provider resolves without giving the page a task turn,
 * so a stream that only awaited it would paint its text, and see clicks, only at the end. MessageChannel,
 * not setTimeout: browsers clamp nested timeouts to 4 ms.
 */
function nextTask() {
  return new Promise((resolve) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = () => {
      channel.port1.close();
      resolve();
    };
    channel.port2.postMessage(null);
  });
}

function random(seed) {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function argmax(values, start, length) {
  let best = 0;
  let top = -Infinity;
  for (let i = 0; i < length; i++) {
    if (values[start + i] > top) {
      top = values[start + i];
      best = i;
    }
  }
  return best;
}

/** One token from the logits at `start`: argmax at temperature 0, else softmax(logits / T) within topP. */
function pick(values, start, length, { temperature, topP, rand }) {
  if (!temperature) return argmax(values, start, length);
  const order = Array.from({ length }, (_, i) => i).sort((a, b) => values[start + b] - values[start + a]);
  const top = values[start + order[0]];
  const weights = order.map((i) => Math.exp((values[start + i] - top) / temperature));
  const total = weights.reduce((a, b) => a + b, 0);
  let kept = 0;
  let mass = 0;
  while (kept < length && mass < topP * total) mass += weights[kept++];
  let r = rand() * mass;
  for (let k = 0; k < kept; k++) {
    r -= weights[k];
    if (r <= 0) return order[k];
  }
  return order[kept - 1];
}

export class ForgeWeb {
  constructor({ ort, session, tokenizer, template, manifest, config, provider, fallback, base }) {
    Object.assign(this, { ort, session, tokenizer, template, manifest, config, base });
    /** "webgpu" or "wasm": the execution provider the model runs on. */
    this.provider = provider;
    /** Why WebGPU was not used (null when it is, or when WASM was asked for). */
    this.fallback = fallback;
    this.layers = config.num_hidden_layers ?? config.n_layer;
    this.kvHeads = config.num_key_value_heads ?? config.num_attention_heads ?? config.n_head;
    this.headDim = config.head_dim ?? (config.hidden_size ?? config.n_embd) / (config.num_attention_heads ?? config.n_head);
    this.eos = new Set(manifest.eos_token_ids);
    this.keepsLogits = session.inputNames.includes("num_logits_to_keep");
    this.busy = Promise.resolve();
  }

  /** Token ids of `text`, as Forge's Python tokenizer gives them (no special tokens added). */
  encode(text) {
    return this.tokenizer.encode(text, { add_special_tokens: false }).ids;
  }

  /** The text of `ids`, special tokens included (as Forge's `Tokenizer.decode`). */
  decode(ids) {
    return this.tokenizer.decode(ids, { skip_special_tokens: false });
  }

  /** A prompt's ids: `encode`, with BOS first when the model wants it. */
  encodePrompt(text) {
    const ids = this.encode(text);
    const bos = this.manifest.bos_token_id;
    return this.manifest.add_bos && bos != null && ids[0] !== bos ? [bos, ...ids] : ids;
  }

  /** The chat template applied to `messages`, ready for the assistant's reply. */
  renderChat(messages) {
    if (!this.template) throw new Error("forge-web: this model has no chat template; use generate(prompt)");
    const special = this.manifest.special_tokens ?? {};
    return this.template.render({ messages, add_generation_prompt: true, ...special });
  }

  /**
   * One forward pass of `ids` after `past`; returns { logits (on the CPU), rows, vocab, present (the new cache) }.
   * `keep`: the logits of the last `keep` positions only (0: all), where the model takes num_logits_to_keep
   * (folders exported before it give all of them): generating reads one row, so the output head runs on one.
   */
  async forward(ids, past, start, keep = 0) {
    const { Tensor } = this.ort;
    const n = ids.length;
    const feeds = {
      input_ids: new Tensor("int64", BigInt64Array.from(ids, BigInt), [1, n]),
      attention_mask: new Tensor("int64", new BigInt64Array(start + n).fill(1n), [1, start + n]),
      position_ids: new Tensor("int64", BigInt64Array.from({ length: n }, (_, i) => BigInt(start + i)), [1, n]),
    };
    if (this.keepsLogits) feeds.num_logits_to_keep = new Tensor("int64", BigInt64Array.of(BigInt(keep)), []);
    for (let i = 0; i < this.layers; i++) {
      for (const kv of ["key", "value"]) {
        feeds[`past_key_values.${i}.${kv}`] =
          past?.[`present.${i}.${kv}`] ?? new Tensor("float32", new Float32Array(0), [1, this.kvHeads, 0, this.headDim]);
      }
    }
    const outputs = await this.session.run(feeds);
    const logits = outputs.logits;
    const data = logits.location === "cpu" ? logits.data : await logits.getData(true);
    const present = {};
    for (const [name, tensor] of Object.entries(outputs)) if (name !== "logits") present[name] = tensor;
    if (past) for (const tensor of Object.values(past)) tensor.dispose?.();
    return { logits: data, rows: logits.dims[1], vocab: logits.dims[2], present };
  }

  /** The argmax token after each position of `ids`, from one forward pass (forced decoding). */
  async topTokens(ids) {
    return this.exclusive(async () => {
      const { logits, vocab, present } = await this.forward(ids, null, 0);
      for (const tensor of Object.values(present)) tensor.dispose?.();
      return Array.from({ length: ids.length }, (_, t) => argmax(logits, t * vocab, vocab));
    });
  }

  /**
   * Token ids after `ids`, one at a time through the KV cache: greedy at temperature 0 (the default),
   * else sampled with `seed`. Stops at `maxTokens`, at an end-of-text token (not yielded), at the context's
   * end, or when `signal` aborts; then calls `onFinish({ finishReason, promptTokens, completionTokens })`,
   * finishReason being "stop", "length" or "abort".
   */
  async *tokens(ids, { maxTokens = 128, temperature = 0, topP = 1, seed, signal, onFinish } = {}) {
    const rand = random(seed ?? Math.floor(Math.random() * 2 ** 32));
    const limit = this.manifest.context_length;
    let past = null;
    let input = ids;
    let start = 0;
    let count = 0;
    let finishReason = "length";
    try {
      while (count < maxTokens && start + input.length < limit) {
        if (signal?.aborted) {
          finishReason = "abort";
          return;
        }
        const out = await this.forward(input, past, start, 1);
        past = out.present;
        start += input.length;
        const token = pick(out.logits, (out.rows - 1) * out.vocab, out.vocab, { temperature, topP, rand });
        if (this.eos.has(token)) {
          finishReason = "stop";
          return;
        }
        count++;
        yield token;
        input = [token];
      }
    } finally {
      if (past) for (const tensor of Object.values(past)) tensor.dispose?.();
      onFinish?.({ finishReason, promptTokens: ids.length, completionTokens: count });
    }
  }

  /** The generated ids after `ids` (see `tokens`). */
  async complete(ids, options = {}) {
    return this.exclusive(async () => {
      const out = [];
      for await (const token of this.tokens(ids, options)) out.push(token);
      return out;
    });
  }

  /** The text of the tokens after `ids`, piece by piece; a piece never ends inside a character. */
  async *streamIds(ids, options = {}) {
    const release = await this.lock();
    try {
      const generated = [];
      let shown = "";
      let stopped = false;
      const onFinish = options.onFinish;
      options = { ...options, onFinish: (info) => onFinish?.(stopped ? { ...info, finishReason: "stop" } : info) };
      const stop = options.stop ? [].concat(options.stop) : [];
      for await (const token of this.tokens(ids, options)) {
        generated.push(token);
        const text = this.decode(generated);
        if (text.endsWith("\uFFFD")) continue;
        const cut = stop.map((s) => text.indexOf(s, Math.max(0, shown.length - s.length))).filter((i) => i >= 0);
        const end = cut.length ? Math.min(...cut) : text.length;
        if (end > shown.length) {
          const piece = text.slice(shown.length, end);
          shown = text.slice(0, end);
          options.onToken?.(piece);
          await nextTask(); // the page paints the piece and handles input before the next forward
          yield piece;
        }
        if (cut.length) {
          stopped = true;
          return;
        }
      }
    } finally {
      release();
    }
  }

  /** `prompt`'s continuation, streamed piece by piece. Options: maxTokens, temperature, topP, seed, stop, signal. */
  stream(prompt, options = {}) {
    return this.streamIds(this.encodePrompt(prompt), options);
  }

  /** `prompt`'s continuation. */
  async generate(prompt, options = {}) {
    let text = "";
    for await (const piece of this.stream(prompt, options)) text += piece;
    return text;
  }

  /** The assistant's reply to `messages` ([{ role, content }]), streamed. */
  streamChat(messages, options = {}) {
    return this.streamIds(this.encode(this.renderChat(messages)), options);
  }

  /** The assistant's reply to `messages`. */
  async chat(messages, options = {}) {
    let text = "";
    for await (const piece of this.streamChat(messages, options)) text += piece;
    return text;
  }

  /** One request at a time: the session's runs don't interleave. Returns the release function. */
  async lock() {
    let release;
    const previous = this.busy;
    this.busy = new Promise((ok) => (release = ok));
    await previous;
    return release;
  }

  async exclusive(fn) {
    const release = await this.lock();
    try {
      return await fn();
    } finally {
      release();
    }
  }
}

/**
 * onnxruntime-web for `provider`: its plain WASM build for "wasm" where the folder has one (without the asyncify
 * instrumentation the WebGPU build needs, a decode step is about 1.2x faster), else the WebGPU build.
 */
async function importOrt(manifest, base, provider) {
  const { module: webgpuBuild, wasm_module: wasmBuild } = manifest.onnxruntime_web;
  const url = new URL(provider === "wasm" && wasmBuild ? wasmBuild : webgpuBuild, base);
  const imported = await import(url.href);
  const ort = imported.default ?? imported;
  ort.env.wasm.wasmPaths = new URL(".", url).href;
  ort.env.logLevel = "error"; // not its notes on which ops run on the CPU
  return ort;
}

/**
 * Load a web folder (default: the folder this module is in). `provider`: "auto" (WebGPU when the browser has an
 * adapter, else WASM), "webgpu" or "wasm". `threads`: WASM threads (they need a cross-origin-isolated page, which
 * `forge web` serves).
 */
export async function load(base = new URL(".", import.meta.url), { provider = "auto", threads } = {}) {
  base = new URL(base, globalThis.location?.href);
  if (!base.href.endsWith("/")) base = new URL(`${base.href}/`);
  const [manifest, config, tokenizerJSON, tokenizerConfig] = await Promise.all(
    ["web.json", "config.json", "tokenizer.json", "tokenizer_config.json"].map((f) => fetchJSON(new URL(f, base))),
  );
  let fallback = null;
  if (provider === "auto") {
    const { adapter, why } = await webgpuAdapter();
    provider = adapter ? "webgpu" : "wasm";
    fallback = why;
  }
  const ort = await importOrt(manifest, base, provider);
  if (threads != null) ort.env.wasm.numThreads = threads;
  else if (!globalThis.crossOriginIsolated) ort.env.wasm.numThreads = 1;
  const options = { executionProviders: [provider], graphOptimizationLevel: "all" };
  if (provider === "webgpu") {
    // The KV cache stays on the GPU from step to step; only the logits come back.
    const where = (name) => (name === "logits" ? "cpu" : "gpu-buffer");
    options.preferredOutputLocation = Object.fromEntries(manifest.outputs.map((name) => [name, where(name)]));
  }
  const session = await ort.InferenceSession.create(new URL(manifest.model, base).href, options);
  const tokenizer = new Tokenizer(tokenizerJSON, tokenizerConfig);
  const template = tokenizerConfig.chat_template ? new Template(tokenizerConfig.chat_template) : null;
  return new ForgeWeb({ ort, session, tokenizer, template, manifest, config, provider, fallback, base });
}
