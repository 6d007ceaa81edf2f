"""``Forge``: the chainable app object.

>>> app = Forge(model="tiny").use(timer()).on("step", lambda e: None)
>>> app.info()["model"]
'tiny'

Async by default (``await app.generate(...)``); ``app.sync`` is the one sync
facade for scripts and notebooks (``app.sync.generate(...)``). Heavy compute
runs in worker threads, so the event loop stays responsive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from forge import compute, server
from forge.config import INFERENCE_DTYPES, PRESETS, ModelConfig, dtype_name, get_preset
from forge.core.device import autocast_dtype, resolve_device
from forge.core.quantize import SCHEMES, has_quantized, quantize_model, weight_bytes
from forge.core.transformer import Transformer
from forge.data import DataSource
from forge.draft import load_draft
from forge.engine import Engine
from forge.errors import CheckpointError, ConfigError, ForgeError, GenerationError
from forge.evaluate import DEFAULT_MAX_TOKENS, EvalConfig
from forge.evaluate import evaluate as evaluate_text
from forge.events import EVENT_NAMES, Emitter, EndEvent, Event, Listener
from forge.generator import AsyncTextStream, GenerationConfig, Generator
from forge.middleware import Context, Middleware
from forge.models import KNOWN_MODELS, export, load, locate, save
from forge.requests import Messages, Tools, build_request, encode, parsed, schema_option
from forge.requests import render as render_prompt
from forge.stack import ErrorHook, Stack
from forge.sync import SyncForge
from forge.tokenizer import Tokenizer, TokenizerKind
from forge.toolcalls import ToolFormat
from forge.trainer import TrainConfig, TrainResult, train

__all__ = ["Forge", "SyncForge"]

InferenceDtype = Literal["auto", "float32", "bfloat16"]
Quantize = Literal["int8", "int4"]


class Forge:
    """A language model app: middleware around every generation, events for progress.

    ``model`` is a preset name (trained by :meth:`train`) or a checkpoint directory. ``quantize="int8"`` or
    ``"int4"`` keeps the linear layers' weights quantized after loading (and after the ``dtype`` cast); the
    embeddings and the output head stay float. Such an app runs inference only.

    A quantized GGUF stays quantized (its exact values; float32 activations on a CPU, see
    ``models.quantized_dtype``) unless ``dtype`` names a float dtype ("float32", "bfloat16"), which asks for it
    dequantized; ``quantize`` then quantizes only the layers the file holds in float. Training such an app trains
    its dequantized float32 twin. ``compile=True`` compiles the decode step (``forge.core.decode.compiled_step``;
    on CUDA, the graphed step): the first generation pays the compile.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = "tiny",
        *,
        device: str = "auto",
        tokenizer: TokenizerKind = "bpe",
        defaults: GenerationConfig | None = None,
        dtype: InferenceDtype | None = None,
        quantize: Quantize | None = None,
        compile: bool = False,
        draft: str | os.PathLike[str] | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.compile = compile
        self._draft_source = draft  # loaded with the model: it must share the model's tokenizer
        self._draft: Transformer | None = None
        self.defaults = defaults or GenerationConfig()
        self.dtype = _inference_dtype(dtype, self.device)
        self._float_dtype_asked = dtype not in (None, "auto")  # a float dtype named: a GGUF is dequantized
        if quantize is not None and quantize not in SCHEMES:  # before loading: a typo costs no load
            raise ConfigError.for_field("Forge", "quantize", quantize, f"use one of {', '.join(SCHEMES)}, or None")
        self.quantize = quantize
        self._tokenizer_kind = tokenizer
        self._emitter = Emitter()
        self._stack = Stack(self._emitter, self._handle)
        self._model: Transformer | None = None
        self._tokenizer: Tokenizer | None = None
        self._generator: Generator | None = None
        self._state: dict[str, Any] | None = None
        self._preset: str | ModelConfig | None = None
        self._source = str(model)
        self._sync: SyncForge | None = None
        self._pretrained: dict[str, Any] = {}
        self._engine: Engine | None = None
        if isinstance(model, str) and model in PRESETS and not _looks_like_path(model):
            self._preset = model  # a preset name wins over a same-named directory: use "./name" for that
        elif Path(model).exists() or str(model) in KNOWN_MODELS:
            # On the compute thread, like all the app's model work: see forge.compute.
            quantized = not self._float_dtype_asked
            loaded = compute.call(load, model, device=self.device, with_state=True, quantized=quantized)
            compute.call(self._adopt, loaded.model, loaded.tokenizer, loaded.training_state)
            self._pretrained = loaded.meta
        elif isinstance(model, os.PathLike) or _looks_like_path(model):
            raise CheckpointError(
                f"model {str(model)!r} does not exist; pass a checkpoint directory, a GGUF file, "
                "a Hugging Face folder, a known model name or a preset name"
            )
        else:
            get_preset(str(model))  # raises PresetNotFoundError with "did you mean"

    @classmethod
    def load(cls, path: str | os.PathLike[str], **options: Any) -> Forge:
        """An app around a model: a Forge checkpoint (with its training state), a GGUF file,
        a Hugging Face folder, or a known model name such as "smollm2"."""
        source = locate(path)
        if not source.exists():
            raise CheckpointError(
                f"model {str(path)!r} does not exist; pass a checkpoint directory written by app.save, "
                "a GGUF file or a Hugging Face folder"
            )
        return cls(source, **options)

    # -- configuration (chainable) -------------------------------------------------------------
    def use(self, middleware: Middleware) -> Forge:
        """Add ``async def mw(ctx, next)`` around every generation; applied in order."""
        if self._stack.built:
            raise ConfigError(
                "Forge.use() was called after the app served its first request: the middleware stack is "
                "built once, at the first generate/stream; register all middleware before that"
            )
        if not callable(middleware) or not (
            inspect.iscoroutinefunction(middleware) or inspect.iscoroutinefunction(type(middleware).__call__)
        ):
            raise ConfigError(
                f"Forge.use() needs an `async def mw(ctx, next)` function, got {middleware!r}; "
                "built-ins are called first, e.g. app.use(timer())"
            )
        self._stack.middleware.append(middleware)
        return self

    def on(self, name: str, listener: Listener) -> Forge:
        """Call ``listener(event)`` on every ``name`` event (sync or async)."""
        self._emitter.on(name, listener)
        return self

    def once(self, name: str, listener: Listener) -> Forge:
        self._emitter.once(name, listener)
        return self

    def off(self, name: str, listener: Listener | None = None) -> Forge:
        self._emitter.off(name, listener)
        return self

    def emit(self, event: Event) -> Forge:
        self._emitter.emit(event)
        return self

    def on_error(self, hook: ErrorHook) -> Forge:
        """``hook(ctx, error)`` (sync or async) answers a failed request with ``ctx.set_text(...)``.

        Hooks run outside all middleware, in order; if none answers, the error
        reaches the caller. Every failure is also emitted as an ``error`` event.
        """
        if not callable(hook):
            raise ConfigError(f"Forge.on_error() needs a callable hook(ctx, error), got {hook!r}")
        self._stack.error_hooks.append(hook)
        return self

    # -- model management --------------------------------------------------------------------------
    @property
    def model(self) -> Transformer | None:
        return self._model

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._tokenizer

    @property
    def source(self) -> str:
        """What the app was made from: a preset name, a checkpoint or model file, or a known model name."""
        return self._source

    def _adopt(self, model: Transformer, tokenizer: Tokenizer, state: dict[str, Any] | None) -> None:
        # "auto" leaves a GGUF kept quantized in the dtype its loader chose for the quantized kernels (bf16).
        if self.dtype is not None and (self._float_dtype_asked or not has_quantized(model)):
            model = model.to(self.dtype)
        if self.quantize is not None:
            quantize_model(model, self.quantize)
        self._model, self._tokenizer, self._state = model, tokenizer, state
        if self._draft_source is not None:
            dtype = None if has_quantized(model) else model.tok_emb.weight.dtype
            self._draft = load_draft(self._draft_source, tokenizer, self.device, dtype)
        self._generator = Generator(model, tokenizer, compile=self.compile, draft=self._draft)

    def save(self, path: str | os.PathLike[str]) -> Forge:
        """Write the model, tokenizer and training state to a checkpoint directory (atomically)."""
        model, tokenizer = self._require_model("save")
        save(path, model, tokenizer, training_state=self._state, meta={"source": self._source})
        return self

    def export(self, path: str | os.PathLike[str], *, format: str = "gguf", dtype: str | None = None) -> Forge:
        """Write the model for llama.cpp/Ollama (``format="gguf"``), transformers (``"hf"``) or onnxruntime and
        transformers.js (``"onnx"``); ``dtype`` defaults to float16 (float32 for ONNX): see ``forge.models.export``."""
        model, tokenizer = self._require_model("export")
        export(model, tokenizer, path, format=format, dtype=dtype, name=Path(self._source).stem or "forge-model")
        return self

    def info(self) -> dict[str, Any]:
        """What the app holds: model, parameters, device, training step, middleware, listeners.

        ``weight_bytes`` is the memory the model holds: parameters and buffers, quantized weights at their
        resident size (:func:`forge.core.quantize.weight_bytes`).
        """
        cfg = self._model.config if self._model is not None else None
        if cfg is None and self._preset is not None:
            cfg = get_preset(self._preset) if isinstance(self._preset, str) else self._preset
        return {
            "model": self._source,
            "trained": self._model is not None,
            "family": cfg.family if cfg else None,
            "config": cfg.to_dict() if cfg else None,
            "parameters": self._model.num_params() if self._model is not None else None,
            "device": str(self.device),
            "dtype": str(next(self._model.parameters()).dtype).removeprefix("torch.") if self._model else None,
            "quantize": self.quantize,
            "weight_bytes": weight_bytes(self._model) if self._model is not None else None,
            "tokenizer_vocab": self._tokenizer.vocab_size if self._tokenizer else None,
            "step": int(self._state["step"]) if self._state else 0,
            "middleware": [getattr(m, "__name__", repr(m)) for m in self._stack.middleware],
            "listeners": {n: len(self._emitter.listeners(n)) for n in EVENT_NAMES if self._emitter.listeners(n)},
            "stack_built": self._stack.built,
            "source": self._pretrained or None,
            "chat_template": bool(self._tokenizer and self._tokenizer.chat_template),
        }

    def _require_model(self, call: str) -> tuple[Transformer, Tokenizer]:
        if self._model is None or self._tokenizer is None:
            raise ForgeError(
                f"app.{call}() needs a trained model, but preset {self._source!r} has not been trained yet; "
                "call `await app.train(data)` first or use Forge.load(checkpoint_dir)"
            )
        return self._model, self._tokenizer

    # -- training ------------------------------------------------------------------------------------
    async def train(
        self,
        data: DataSource,
        *,
        steps: int | None = None,
        out: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> TrainResult:
        """Train on ``data`` until the model has had ``steps`` optimizer steps in total; events go to the listeners.

        ``steps`` counts as everywhere else (``forge.train``, ``forge train --steps``): in total, so a
        model at step 300 trained with ``steps=500`` takes 200 more. Unset: 1000 steps, or as many as fit
        in a ``time="2m"`` budget (see ``TrainConfig.time``). The first call builds the model from
        the preset (and a tokenizer from the data); later calls, or an app loaded from a checkpoint,
        continue training the same model and optimizer. ``options`` are TrainConfig fields.
        """
        self._emitter.bind_loop(asyncio.get_running_loop())
        try:
            # Its own thread: the app's other jobs (another app's requests) go on meanwhile; see forge.compute.
            return await compute.run_apart(self._train, data, steps, out, options)
        finally:  # async listeners of the run's events have finished when train returns
            await self._emitter.drain()

    def _train(self, data: DataSource, steps: int | None, out: Any, options: dict[str, Any]) -> TrainResult:
        if self.quantize is not None:
            raise ConfigError(
                f"this app holds {self.quantize} weights for inference (quantize={self.quantize!r}); quantized "
                "weights cannot be trained: create the app without quantize to train it, then load it quantized"
            )
        if self.dtype not in (None, torch.float32):
            raise ConfigError(
                f"this app holds {str(self.dtype).removeprefix('torch.')} weights for fast inference (dtype=...); "
                "training needs float32 master weights: create the app without dtype to train it"
            )
        ended: list[Event] = []

        def relay(event: Event) -> None:  # "end" waits until the app holds the trained model
            (ended.append if isinstance(event, EndEvent) else self._emitter.emit)(event)

        kwargs: dict[str, Any] = dict(out=out, device=str(self.device), listeners=[relay], **options)
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown := sorted(set(options) - fields - {"vocab_size"}):
            raise ConfigError(f"app.train() got unknown options {unknown}; options are {sorted(fields)}")
        if self._model is None:
            result = train(data, preset=self._preset or "tiny", tokenizer=self._tokenizer_kind, steps=steps, **kwargs)
        else:
            lock = self._generator.lock if self._generator else threading.Lock()
            with lock:  # no generation while the weights change
                result = train(
                    data, model=self._model, tokenizer=self._tokenizer, state=self._state, steps=steps, **kwargs
                )
        self._adopt(result.model, result.tokenizer, result.state)
        for event in ended:
            self._emitter.emit(event)
        return result

    # -- generation ------------------------------------------------------------------------------------
    async def _handle(self, ctx: Context) -> None:
        """The innermost handler: the model itself."""
        _, tokenizer = self._require_model("generate")
        assert self._generator is not None
        if ctx.messages is not None and ctx.messages != ctx.rendered:  # a middleware changed the conversation
            ctx.prompt = render_prompt(tokenizer, ctx.messages, tools=ctx.tools)
            ctx.rendered = [dict(m) for m in ctx.messages]
        if ctx.ids is None:  # tokenized once, here, unless the caller gave the ids; prefix cache off: reusing nothing
            ctx.ids = await encode(tokenizer, ctx.prompt, remember=getattr(self._engine, "prefix_cache", 1) is not None)
        # The engine (serving: continuous batching) or the plain generator admits it: length, budget, seed.
        run = self._engine.stream if self._engine is not None else self._generator.astream
        stream = run(ctx.prompt, ctx.params, ids=ctx.ids, strict=ctx.strict_budget)
        ctx.model_stream = stream
        if ctx.stream:
            ctx.chunks = _completing(stream, ctx)
            return
        try:  # cancelling this task closes the stream, which stops the generation
            ctx.response = "".join([piece async for piece in stream])
        finally:
            await stream.aclose()
        ctx.completion = stream.completion

    async def generate(self, prompt: str | Sequence[str], *, schema: Any = None, **options: Any) -> Any:
        """The completion of ``prompt`` through the middleware stack; a list of prompts gives a list.

        ``schema`` constrains the output and returns it parsed and validated: a
        pydantic model class gives an instance, a JSON-schema dict gives JSON
        values, a regex gives the matching string. Tokens that would break the
        schema are masked out while sampling, so even a tiny model's output fits.

        >>> await app.generate("A city:", schema=City)  # doctest: +SKIP
        City(name='Paris', population=2100000)
        """
        if not isinstance(prompt, str):
            if isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
                return list(await asyncio.gather(*(self.generate(p, schema=schema, **options) for p in prompt)))
            raise ConfigError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.80}")
        spec = schema_option(schema, options)
        ctx = self.request(prompt, **options)
        return parsed(spec, await self.handle(ctx), ctx)

    async def stream(self, prompt: str, **options: Any) -> AsyncIterator[str]:
        """Text pieces of the completion as they arrive, through the middleware stack."""
        async for piece in self.handle_stream(self.request(prompt, stream=True, **options)):
            yield piece

    async def chat(self, messages: Messages, *, schema: Any = None, **options: Any) -> Any:
        """The assistant's reply to ``messages`` (``[{"role": "user", "content": "Hi"}]``, or a string).

        ``schema`` works as in :meth:`generate`: the reply is parsed and validated.

        The prompt is rendered with the model's chat template; generation stops
        at the model's end-of-turn token. Goes through the middleware stack,
        with ``ctx.messages`` set. ``tools``, ``tool_choice`` and ``parallel_tool_calls``
        keep OpenAI's meanings (see :meth:`request`).
        """
        spec = schema_option(schema, options)
        ctx = self.request(messages=messages, **options)
        return parsed(spec, await self.handle(ctx), ctx)

    async def chat_stream(self, messages: Messages, **options: Any) -> AsyncIterator[str]:
        """The assistant's reply to ``messages``, piece by piece."""
        async for piece in self.handle_stream(self.request(messages=messages, stream=True, **options)):
            yield piece

    async def embed(self, texts: str | Sequence[str]) -> list[list[float]]:
        """One vector per text: the model's final hidden states, mean-pooled and L2-normalised.

        A language model's own embeddings are a stopgap; a RAG embedder is better at retrieval.
        """
        model, tokenizer = self._require_model("embed")
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch or not all(isinstance(t, str) for t in batch):
            raise ConfigError("app.embed() needs a string or a non-empty list of strings")
        context = model.config.context_length
        ids = tokenizer.encode_batch(batch)
        if too_long := [i for i, row in enumerate(ids) if len(row) > context]:
            raise GenerationError(
                f"input {too_long[0]} is {len(ids[too_long[0]])} tokens but the model's context is {context}; "
                "shorten it"
            )

        def run() -> list[list[float]]:
            out = []
            with torch.inference_mode():
                for row in ids:  # one at a time: no padding, so the pooled vector is exact
                    x = torch.tensor([row or [tokenizer.eos_id or 0]], device=self.device)
                    pooled = model.hidden(x)[0].float().mean(dim=0)
                    out.append(torch.nn.functional.normalize(pooled, dim=0).tolist())
            return out

        return await compute.run(run)

    async def evaluate(
        self,
        text_or_path: str | os.PathLike[str],
        *,
        window: int | None = None,
        stride: int | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> dict[str, Any]:
        """Bits per byte and perplexity of the model on a text (a ``str``) or a text file (a ``pathlib.Path``).

        Sliding windows of ``window`` tokens (default: the model's context) move on by ``stride`` (default: half
        the window); at most ``max_tokens`` tokens are scored (``truncated`` says when the text was longer). The
        model runs as loaded: its dtype, its quantized weights. See :mod:`forge.evaluate`.

        >>> (await app.evaluate(Path("notes.txt")))["bits_per_byte"]  # doctest: +SKIP
        1.77
        """
        model, tokenizer = self._require_model("evaluate")
        config = EvalConfig(window=window, stride=stride, max_tokens=max_tokens)
        assert self._generator is not None
        lock = self._generator.lock

        def run() -> dict[str, Any]:
            with lock:  # the weights don't change (training) while they are scored
                return evaluate_text(model, tokenizer, text_or_path, config).to_dict()

        result = await compute.run(run)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return {**result, "model": self._source, "dtype": dtype, "quantize": self.quantize}

    def render(self, messages: Messages, *, add_generation_prompt: bool = True, tools: Tools | None = None) -> str:
        """The prompt that :meth:`chat` gives the model for ``messages`` (and ``tools``, OpenAI ``tools`` entries)."""
        _, tokenizer = self._require_model("render")
        return render_prompt(tokenizer, messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def tool_format(self) -> ToolFormat:
        """How this model writes tool calls: its chat template's own format, or Forge's default."""
        _, tokenizer = self._require_model("tool_format")
        return ToolFormat.for_template(tokenizer.chat_template)

    def request(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        stream: bool = False,
        tools: Tools | None = None,
        allowed_tools: Tools | None = None,
        tool_choice: str | None = None,
        parallel_tool_calls: bool = False,
        id: str | None = None,
        strict: bool = False,
        ids: Sequence[int] | None = None,
        meta: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Context:
        """A complete request for :meth:`handle` / :meth:`handle_stream`: a prompt, or chat ``messages``.

        ``options`` are GenerationConfig fields over the app's defaults. ``tools`` (OpenAI
        ``tools`` entries), ``tool_choice`` and ``parallel_tool_calls`` describe the tools in
        the prompt and hold the reply to the model's tool-call format (``ctx.tool_format``
        parses it); ``allowed_tools`` narrows the ones it may call. ``strict`` refuses an
        explicit ``max_tokens`` that does not fit after the prompt (``ContextLengthError``)
        instead of stopping at the context length. ``ids``: the prompt's token ids, if known.
        ``id`` and ``meta`` become ``ctx.id`` and ``ctx.meta``. After handling,
        ``ctx.completion`` has the finish reason, token counts and logprobs.

        >>> ctx = app.request(messages=[{"role": "user", "content": "Hi"}], max_tokens=8)  # doctest: +SKIP
        >>> text = await app.handle(ctx)  # doctest: +SKIP
        """
        tokenizer = self._require_model("chat")[1] if messages is not None else self._tokenizer
        return build_request(
            tokenizer,
            self.defaults,
            prompt,
            messages=messages,
            stream=stream,
            tools=tools,
            allowed_tools=allowed_tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            id=id,
            strict=strict,
            ids=ids,
            meta=meta,
            **options,
        )

    async def handle(self, ctx: Context) -> str:
        """Run a non-streaming request (from :meth:`request`) through the middleware stack; the response text."""
        return await self._stack.handle(ctx)

    def handle_stream(self, ctx: Context) -> AsyncIterator[str]:
        """Run a streaming request (from :meth:`request`) through the middleware stack; text pieces as they arrive."""
        return self._stack.handle_stream(ctx)

    # -- serving ---------------------------------------------------------------------------------------
    async def listen(self, port: int = 8000, *, host: str = "127.0.0.1", **options: Any) -> None:
        """Serve this app, its model and its middleware, as an OpenAI-compatible API until cancelled.

        ``options`` go to :func:`forge.server.serve`: ``api_key``, ``max_batch``,
        ``max_queue``, ``context``, ``cors_origins``, ``max_body_size``,
        ``model_name``, ``ready`` (an ``asyncio.Event`` set once it listens).
        Cancelling the task shuts down gracefully: in-flight requests finish.

        >>> await Forge.load("runs/notes").use(logger()).listen(8000)  # doctest: +SKIP
        """
        await server.serve(self, host=host, port=port, **options)

    # -- continuous batching (the server's engine) ----------------------------------------------------
    async def start_batching(
        self,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        context: int | None = None,
        prefix_cache: bool = True,
        speculate: str = "off",
    ) -> Forge:
        """Serve every generation through a continuous-batching engine: concurrent requests decode together.

        ``max_batch`` requests run at once (each in its own KV-cache slot); up to
        ``max_queue`` more wait, and beyond that a request fails with ``QueueFullError``
        (HTTP 429). ``context`` caps prompt + completion tokens (default: the model's).
        ``prefix_cache``: a request starts from the stored keys and values of the longest
        prompt beginning seen before (a shared system prompt). ``speculate="ngram"`` (or ``"draft"``,
        with the app's draft model): every request decodes speculatively (see ``forge.core.speculative``).
        """
        model, tokenizer = self._require_model("start_batching")
        if self._engine is not None:
            raise ConfigError("batching is already on; call app.stop_batching() first")
        assert self._generator is not None
        self._engine = await compute.run(  # its KV cache is allocated there, and it steps there
            lambda: Engine(
                model,
                tokenizer,
                max_batch=max_batch,
                max_queue=max_queue,
                max_len=context,
                lock=self._generator.lock if self._generator else None,
                prefix_cache=prefix_cache,
                speculate=speculate,
                draft=self._draft,
            ).start()
        )
        return self

    async def stop_batching(self, *, drain: bool = True) -> None:
        """Stop the engine; with ``drain``, running and queued requests finish first."""
        engine = self._engine
        if engine is not None:
            await engine.stop(drain=drain)  # requests arriving meanwhile are refused with a 429
            self._engine = None

    def batching_stats(self) -> dict[str, Any] | None:
        """The engine's counters (queue_depth, running, max_batch, steps, tokens, batch_size_max,
        batch_size_hist, completed, cancelled), or None when batching is off."""
        return self._engine.snapshot() if self._engine is not None else None

    # -- the sync facade ---------------------------------------------------------------------------------
    @property
    def sync(self) -> SyncForge:
        """Blocking twins of the async methods: ``app.sync.generate(...)``, ``app.sync.train(...)``."""
        if self._sync is None:
            self._sync = SyncForge(self)
        return self._sync

    def __repr__(self) -> str:
        state = "trained" if self._model is not None else "untrained"
        return f"Forge(model={self._source!r}, {state}, device={self.device}, middleware={len(self._stack.middleware)})"


async def _completing(source: AsyncTextStream, ctx: Context) -> AsyncIterator[str]:
    """The model's stream; sets ``ctx.completion`` once it has run to the end."""
    try:
        async for piece in source:
            yield piece
        ctx.completion = source.completion
    finally:
        await source.aclose()


def _inference_dtype(dtype: str | None, device: torch.device) -> torch.dtype | None:
    """None keeps the weights as loaded (float32); "auto" is bfloat16 where the hardware runs it natively."""
    if dtype is None:
        return None
    name = dtype_name(dtype, INFERENCE_DTYPES, owner="Forge", field="dtype")  # float16: too slow/lossy on CPUs
    if name == "auto":
        return autocast_dtype(device) or torch.float32
    return getattr(torch, name)  # type: ignore[no-any-return]


#: Suffixes of model files: a name ending in one is a path that is missing, never a preset.
_MODEL_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json", ".onnx")


def _looks_like_path(name: str | os.PathLike[str]) -> bool:
    name = str(name)
    return "/" in name or os.sep in name or name.startswith((".", "~")) or name.lower().endswith(_MODEL_SUFFIXES)
