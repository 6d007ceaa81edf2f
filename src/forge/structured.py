"""Structured output: generated text that always fits a JSON schema, a regex, or another grammar.

A schema becomes a :class:`Grammar`; during generation each sequence gets a
:class:`Constraint` that, every step, computes the tokens that keep the text
inside the grammar, as a packed bitmask over the vocabulary. Forge's sampler
(``forge.core.sampling``) masks the rest out before it samples, on any
device, in the plain generator and in the batching engine alike. So output
that ends (at the model's end-of-sequence token) is valid by construction;
output cut short by ``max_tokens`` is reported as incomplete, never returned
as if it were valid.

The grammars are compiled and matched by llguidance. Why llguidance rather
than xgrammar or outlines-core:

- **Per-request grammars start instantly.** llguidance computes each mask
  lazily from a derivative-based lexer and an Earley parser (about 0.1 ms a
  token on SmolLM2's 49k vocabulary) and needs no ahead-of-time index: a new
  schema costs about a millisecond. outlines-core builds an index over the
  whole vocabulary for every regex, and xgrammar compiles every grammar up
  front; a server where every request brings its own tools pays that each time.
- **One language for everything Forge needs.** JSON schema, regex, and Lark
  with embedded ``%json`` sub-grammars, which the tool-call formats need
  ("free text, or a tagged JSON call"). outlines-core is regex only.
- **Light.** A 3 MB wheel with no dependencies; xgrammar requires
  transformers and triton at run time, which Forge's runtime does not.
- llama.cpp, vLLM and SGLang use it, so its JSON-schema coverage is well tested.

Tool calls (their formats, the grammars that admit them, the streaming parser) live in ``forge.toolcalls``.

>>> spec = output_spec({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
>>> spec.parse('{"n": 3}')
{'n': 3}
"""

from __future__ import annotations

import functools
import json
import re
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import llguidance
import pydantic
import torch

from forge.errors import ConfigError, GenerationError
from forge.tokenizer import Tokenizer

__all__ = [
    "JSON_STYLE",
    "Constraint",
    "Grammar",
    "OutputSpec",
    "SchemaLimits",
    "check_schema",
    "closed_schema",
    "output_spec",
]

#: JSON as ``json.dumps`` writes it: ", " and ": " separators and no other whitespace.
#: Free whitespace lets a small model wander into endless newlines; one fixed layout also streams predictably.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True, slots=True)
class Grammar:
    """A constraint on generated text, in llguidance's grammar format.

    Build one with :meth:`json_schema`, :meth:`regex` or :meth:`lark`. ``source``
    is what llguidance compiles; ``description`` names it in error messages.
    """

    source: str = field(repr=False)
    description: str

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any], description: str = "JSON schema") -> Grammar:
        """Text that is one JSON value valid for ``schema`` (draft 2020-12), written as ``json.dumps`` would.

        An object with ``properties`` and no ``additionalProperties`` gets no
        keys beyond those it names (as in OpenAI's strict mode): extra keys still
        validate, but a model that may invent them wanders off and runs out of tokens.
        """
        check_schema(schema)
        closed = closed_schema(dict(schema))
        styled = {**closed, "x-guidance": {**JSON_STYLE, **dict(schema.get("x-guidance") or {})}}
        try:
            source = llguidance.LLMatcher.grammar_from_json_schema(styled)
        except (ValueError, TypeError) as e:  # e.g. an integer llguidance cannot hold
            raise ConfigError(f"the {description} cannot be used for constrained decoding: {_brief(e)}") from None
        return cls._checked(source, description)

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        """Text that fully matches ``pattern`` (Rust regex syntax: no lookaround or backreferences)."""
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"a regex constraint must be a non-empty string, got {pattern!r}")
        return cls._checked(llguidance.LLMatcher.grammar_from_regex(pattern), f"regex {pattern!r}")

    @classmethod
    def lark(cls, source: str, description: str = "grammar") -> Grammar:
        """Text in the language of a Lark grammar (llguidance's dialect: ``%json {...}`` embeds a JSON schema)."""
        return cls._checked(llguidance.LLMatcher.grammar_from_lark(source), description)

    @classmethod
    def _checked(cls, source: str, description: str) -> Grammar:
        is_error, messages = _validate(source)
        if is_error:
            raise ConfigError(
                f"the {description} cannot be used for constrained decoding: {_brief('; '.join(messages))}"
            )
        return cls(source, description)


@functools.lru_cache(maxsize=256)
def _validate(source: str) -> tuple[bool, list[str]]:
    """llguidance's check of a grammar, once per grammar: an agent or a server rebuilds the same tool grammars
    every step and request."""
    return llguidance.LLMatcher.validate_grammar_with_warnings(source, limits=_limits())  # type: ignore[no-any-return]


def _limits() -> llguidance.LLParserLimits:
    # Not verbose: llguidance's verbose errors carry its parser state and the whole grammar, not for a client's eyes.
    return llguidance.LLParserLimits(verbose_errors=False)


def _brief(error: object) -> str:
    """llguidance's message, first line only and short: its later lines quote the grammar back."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


#: Integers llguidance can hold: it reads JSON numbers as 64-bit.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class SchemaLimits:
    """Bounds on a JSON schema: compiling one takes time that grows with its size (seconds for thousands of keys).

    ``max_bytes``: its JSON text; ``max_properties``: property names over the whole schema; ``max_depth``:
    nesting of objects and lists. None: no bound. The defaults admit what OpenAI's structured outputs admit.

    >>> SchemaLimits().check({"type": "object", "properties": {"n": {"type": "integer"}}})
    """

    max_bytes: int | None = 64 * 1024
    max_properties: int | None = 1000
    max_depth: int = 64

    def check(self, schema: object, what: str = "the JSON schema") -> None:
        """ConfigError naming the bound ``schema`` breaks; also integers beyond 64 bits, which llguidance can't hold."""
        properties = 0
        stack: list[tuple[object, int, str]] = [(schema, 1, "")]
        while stack:  # a loop, not recursion: the schema may be nested deeper than Python's stack
            node, depth, path = stack.pop()
            if depth > self.max_depth:
                raise ConfigError(
                    f"{what} is nested more than {self.max_depth} levels deep (at {path[:60]}...); "
                    "flatten it, e.g. with $defs"
                )
            if isinstance(node, Mapping):
                if isinstance(node.get("properties"), Mapping):
                    properties += len(node["properties"])
                stack.extend((v, depth + 1, f"{path}/{k}") for k, v in node.items())
            elif isinstance(node, list):
                stack.extend((v, depth + 1, f"{path}/{i}") for i, v in enumerate(node))
            elif isinstance(node, int) and not isinstance(node, bool) and not _INT_MIN <= node <= _INT_MAX:
                raise ConfigError(
                    f"{what} has the integer {node} (at {path or 'the root'}), which does not fit in 64 bits; "
                    f"use a value between {_INT_MIN} and {_INT_MAX}"
                )
        if self.max_properties is not None and properties > self.max_properties:
            raise ConfigError(
                f"{what} has {properties} properties; at most {self.max_properties} are allowed; split it up"
            )
        if self.max_bytes is not None and (size := len(json.dumps(schema))) > self.max_bytes:
            raise ConfigError(f"{what} is {size} bytes as JSON; at most {self.max_bytes} are allowed; shorten it")


#: What every schema must meet, even a trusted caller's: deeper nesting overflows jsonschema's recursion.
_ANY_SCHEMA = SchemaLimits(max_bytes=None, max_properties=None)


def closed_schema(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists properties and says nothing."""
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: closed_schema(v) if k not in ("enum", "const", "default", "examples") else v for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def check_schema(schema: object) -> None:
    """ConfigError unless ``schema`` is a valid JSON schema (draft 2020-12) nested no deeper than Python can check."""
    if not isinstance(schema, Mapping):
        raise ConfigError(f"a JSON schema must be a dict, got {type(schema).__name__}")
    _ANY_SCHEMA.check(schema)  # before anything recurses into it
    try:
        jsonschema.Draft202012Validator.check_schema(dict(schema))
    except jsonschema.SchemaError as e:
        where = "/".join(map(str, e.path)) or "the root"
        raise ConfigError(f"the JSON schema is invalid: {e.message} (at {where}); fix the schema") from None


# -- what app.generate(schema=...) takes and returns ------------------------------------------------------------
@dataclass(frozen=True)
class OutputSpec:
    """A grammar and how to turn the text it admits into the caller's value."""

    grammar: Grammar
    parse_text: Callable[[str], Any] = field(repr=False)

    def parse(self, text: str, finish_reason: str | None = "stop") -> Any:
        """The validated value of ``text``; GenerationError if generation stopped before the output was whole."""
        if finish_reason == "length":
            raise GenerationError(
                f"the output hit max_tokens before it completed the {self.grammar.description} "
                f"(got {text[:80]!r}{'...' if len(text) > 80 else ''}); raise max_tokens"
            )
        try:
            return self.parse_text(text)
        except (ValueError, jsonschema.ValidationError, pydantic.ValidationError) as e:
            # Cannot happen for text that ran to its end under the grammar; a middleware may have changed it.
            raise GenerationError(f"the output does not fit the {self.grammar.description}: {e}") from None


def output_spec(schema: object) -> OutputSpec:
    """The :class:`OutputSpec` for ``schema``: a pydantic model class, a JSON-schema dict, a regex, or a Grammar.

    A pydantic model parses to an instance of it, a dict schema to plain JSON
    values, a regex (a ``str`` or ``re.Pattern``) to the matched string.
    """
    if isinstance(schema, OutputSpec):
        return schema
    if isinstance(schema, Grammar):
        return OutputSpec(schema, lambda text: text)
    if isinstance(schema, type) and issubclass(schema, pydantic.BaseModel):
        grammar = Grammar.json_schema(schema.model_json_schema(), f"schema of {schema.__name__}")
        return OutputSpec(grammar, schema.model_validate_json)
    if isinstance(schema, Mapping):
        grammar = Grammar.json_schema(schema)
        validator = jsonschema.Draft202012Validator(dict(schema))

        def parse_json(text: str) -> Any:
            value = json.loads(text)
            validator.validate(value)
            return value

        return OutputSpec(grammar, parse_json)
    if isinstance(schema, (str, re.Pattern)):
        pattern = schema.pattern if isinstance(schema, re.Pattern) else schema
        compiled = re.compile(pattern, schema.flags if isinstance(schema, re.Pattern) else 0)

        def parse_regex(text: str) -> str:
            if compiled.fullmatch(text) is None:
                raise ValueError(f"{text!r} does not match {pattern!r}")
            return text

        return OutputSpec(Grammar.regex(pattern), parse_regex)
    raise ConfigError(
        f"schema={schema!r:.80} is not supported; pass a pydantic model class, a JSON-schema dict, "
        "a regex string, or a forge.structured.Grammar"
    )


# -- the per-sequence matcher ----------------------------------------------------------------------------------------
_LL_TOKENIZERS: weakref.WeakKeyDictionary[Tokenizer, dict[int, llguidance.LLTokenizer]] = weakref.WeakKeyDictionary()


def _ll_tokenizer(tokenizer: Tokenizer, vocab: int) -> llguidance.LLTokenizer:
    """llguidance's view of ``tokenizer`` (about 0.15 s to build for 49k tokens; cached per tokenizer)."""
    cached = _LL_TOKENIZERS.setdefault(tokenizer, {})
    if vocab not in cached:
        try:
            cached[vocab] = llguidance.LLTokenizer(
                tokenizer.to_str(), n_vocab=vocab, eos_token=sorted(tokenizer.stop_ids) or None
            )
        except Exception as e:  # llguidance raises ValueError/RuntimeError on tokenizers it cannot map to bytes
            raise ConfigError(
                f"constrained decoding cannot use this tokenizer ({e}); it needs a byte-level BPE or "
                "byte-fallback tokenizer, as Forge trains and Llama/GPT-2 models ship"
            ) from None
    return cached[vocab]


@functools.lru_cache(maxsize=64)
def _compiled(ll_tokenizer: llguidance.LLTokenizer, source: str, vocab: int) -> llguidance.LLMatcher:
    """A grammar compiled for a tokenizer, at its start: each :class:`Constraint` copies it (about 1000x cheaper
    than compiling, which takes seconds for a large schema). So a server can compile in a worker thread first,
    and the constraint built on its event loop afterwards only copies."""
    matcher = llguidance.LLMatcher(ll_tokenizer, source, limits=_limits())
    if not matcher.is_error():  # the first mask finds grammars with no sentence at all (a $ref loop)
        words = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
        matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
    return matcher


class Constraint:
    """One sequence's grammar state: a :class:`forge.core.sampling.TokenConstraint` over llguidance.

    ``vocab`` is the model's (possibly padded) vocabulary size, the width of its logits.
    """

    def __init__(self, grammar: Grammar, tokenizer: Tokenizer, vocab: int) -> None:
        self.grammar, self.stop_ids = grammar, tokenizer.stop_ids
        compiled = _compiled(_ll_tokenizer(tokenizer, vocab), grammar.source, vocab)
        if compiled.is_error():
            error = _brief(compiled.get_error())
            hint = "; a $ref that only refers to itself has no base case: give it one" if "NoExtension" in error else ""
            raise ConfigError(f"the {grammar.description} admits no text to generate ({error}){hint}")
        self.matcher = compiled.deep_copy()
        self.ended = False  # a stop token was accepted: the sequence is over
        self._check()

    def fill_mask(self, words: torch.Tensor) -> None:
        if self.ended:
            return  # the row is finished; whatever it samples now is discarded
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
        self._check()

    def accept(self, token: int) -> None:
        if self.ended:
            return
        if token in self.stop_ids:
            self.ended = True
            return
        if not self.matcher.consume_token(token):
            self._check()
            raise GenerationError(f"token {token} broke the {self.grammar.description}; this is a bug in Forge")

    @property
    def complete(self) -> bool:
        """Whether the text so far is a whole sentence of the grammar."""
        return self.ended or self.matcher.is_accepting()

    def _check(self) -> None:
        if self.matcher.is_error():
            error = _brief(self.matcher.get_error())
            raise GenerationError(f"the {self.grammar.description} failed while generating: {error}")
