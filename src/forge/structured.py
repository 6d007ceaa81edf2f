"""Structured output: generated text that always fits a JSON schema, a regex, or another grammar.

A schema becomes a :class:`Grammar`; during generation each sequence gets a
:class:`Constraint` that, every step, computes the tokens that keep the text
inside the grammar, as a packed bitmask over the vocabulary. Forge's sampler
(``forge.core.sampling``) masks the rest out before it samples, on any
device, in the plain generator and in the batching engine alike. So output
that ends (at the model's end-of-sequence token) is valid by construction.
The constraint also knows the sequence's budget: as the tokens left near
what the grammar needs to close, it allows only tokens that keep a valid end
in reach, so a reply always ends validly within ``max_tokens`` when the
budget can hold the shortest valid output at all (and is refused at once
when it cannot).

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
import numpy as np
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
    ``close_in_budget``: steer the text to a valid end before ``max_tokens`` runs out (see :class:`Constraint`);
    off, a long reply may be cut short and is then reported incomplete.
    """

    source: str = field(repr=False)
    description: str
    close_in_budget: bool = True

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

    ``vocab`` is the model's (possibly padded) vocabulary size, the width of its logits. ``budget``: the
    tokens the sequence may generate. With it the output always ends validly within the budget: as the tokens
    left near what the grammar needs to close, the mask keeps only tokens that leave a valid end in reach, and
    at the last moment only the shortest way there. A budget that cannot hold even the shortest valid output
    is a GenerationError at once.
    """

    def __init__(self, grammar: Grammar, tokenizer: Tokenizer, vocab: int, budget: int | None = None) -> None:
        self.grammar, self.stop_ids = grammar, tokenizer.stop_ids
        ll_tokenizer = _ll_tokenizer(tokenizer, vocab)
        compiled = _compiled(ll_tokenizer, grammar.source, vocab)
        if compiled.is_error():
            error = _brief(compiled.get_error())
            hint = "; a $ref that only refers to itself has no base case: give it one" if "NoExtension" in error else ""
            raise ConfigError(f"the {grammar.description} admits no text to generate ({error}){hint}")
        self.matcher = compiled.deep_copy()
        self.ended = False  # a stop token was accepted: the sequence is over
        self._check()
        self.budget, self.used = budget, 0  # tokens this sequence may generate, and has generated
        watched = budget is not None and grammar.close_in_budget
        self._closer = _Closer(self.matcher, _token_table(tokenizer, ll_tokenizer), vocab) if watched else None
        if self._closer is not None and budget is not None:
            path = self._closer.path()
            if path is not None and len(path) > budget:
                text = self._closer.text(path)
                text = text if len(text) <= 80 else text[:77] + "..."
                raise GenerationError(
                    f"max_tokens={budget} cannot hold even the shortest output the {grammar.description} admits "
                    f"({text!r}: {len(path)} tokens with the end-of-text token); raise max_tokens to at least "
                    f"{len(path)}",
                    field="max_tokens",
                )

    def fill_mask(self, words: torch.Tensor) -> None:
        if self.ended:
            return  # the row is finished; whatever it samples now is discarded
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
        self._check()
        if self._closer is not None and self.budget is not None:
            self._closer.fit(words, self.budget - self.used)

    def accept(self, token: int) -> None:
        if self.ended:
            return
        self.used += 1
        if token in self.stop_ids:
            self.ended = True
            return
        if not self.matcher.consume_token(token):
            self._check()
            raise GenerationError(f"token {token} broke the {self.grammar.description}; this is a bug in Forge")
        if self._closer is not None:
            self._closer.advanced(token)

    def rollback(self, n: int) -> None:
        """Take back the last ``n`` accepted tokens (a speculative step's rejected draft); not past a stop token."""
        if n <= 0:
            return
        assert not self.ended, "a finished sequence takes nothing back"
        self.matcher.rollback(n)
        self.used -= n
        if self._closer is not None:
            self._closer.forget()

    @property
    def complete(self) -> bool:
        """Whether the text so far is a whole sentence of the grammar."""
        return self.ended or self.matcher.is_accepting()

    def _check(self) -> None:
        if self.matcher.is_error():
            error = _brief(self.matcher.get_error())
            raise GenerationError(f"the {self.grammar.description} failed while generating: {error}")


# -- budget: the shortest way to a valid end ----------------------------------------------------------------------
#: Slack (tokens left beyond the shortest close) at or below which only tokens that keep a close within reach
#: are allowed. Above it any token the grammar admits is, so one token must not raise the close by more: opening
#: an object of a dozen required keys does; its tokens are held back once the budget gets this tight.
CLOSE_WINDOW = 32
#: Bytes the closing search writes at most before it gives up (then the budget is not watched).
_CLOSE_MAX_BYTES = 2048
#: Non-neutral tokens checked one by one at a tight step, at most (about 20 us each with Python's share): the
#: most common merges, lowest ids first, hold the closing quote-and-comma kind.
_MAX_CHECKED = 512
#: The bytes the closing search tries first: what ends strings, objects and lists, and the shortest values.
_FIRST = b'}]",0 :nft[{123456789-.eE' + bytes(range(ord("a"), ord("z") + 1)) + bytes(range(ord("A"), ord("Z") + 1))
_PRIORITY = list(dict.fromkeys([*_FIRST, *range(256)]))


@dataclass(frozen=True, slots=True)
class _TokenTable:
    """Per tokenizer: the single-byte tokens and, per token, which byte values it holds (V, 4) as 256-bit sets."""

    ll: llguidance.LLTokenizer
    byte_token: list[int | None]
    data: list[bytes]  # each token's bytes
    bits: np.ndarray  # (V, 4) uint64
    empty: np.ndarray  # (V,) bool: special tokens, no bytes


_TOKEN_TABLES: weakref.WeakKeyDictionary[Tokenizer, dict[int, _TokenTable]] = weakref.WeakKeyDictionary()


def _token_table(tokenizer: Tokenizer, ll: llguidance.LLTokenizer) -> _TokenTable:
    """The :class:`_TokenTable` of ``ll`` (about 0.1 s for 49k tokens; cached per tokenizer)."""
    cached = _TOKEN_TABLES.setdefault(tokenizer, {})
    if ll.vocab_size not in cached:
        byte_token: list[int | None] = []
        for b in range(256):
            ids = ll.tokenize_bytes(bytes([b]))
            byte_token.append(ids[0] if len(ids) == 1 else None)
        bits = np.zeros((ll.vocab_size, 4), dtype=np.uint64)
        empty = np.zeros(ll.vocab_size, dtype=bool)
        data = [b"" if ll.is_special_token(t) else ll.decode_bytes([t]) for t in range(ll.vocab_size)]
        for t, held in enumerate(data):
            empty[t] = not held
            for b in set(held):
                bits[t, b >> 6] |= np.uint64(1) << np.uint64(b & 63)
        cached[ll.vocab_size] = _TokenTable(ll, byte_token, data, bits, empty)
    return cached[ll.vocab_size]


def _allowed(mask: bytes, token: int) -> bool:
    return bool(mask[token >> 3] >> (token & 7) & 1)


class _Closer:
    """Keeps a sequence able to end validly within its budget (Constraint's ``budget``).

    Each step it knows a shortest way to a valid end: greedy over single bytes, closers and short values first,
    a byte that leaves the grammar where it was (string content) skipped while another one moves on; forced
    bytes taken whole; then tokenized, with the end-of-text token last. With ``left`` tokens to go:

    - ``left == len(path)``: only the path's next token is allowed, so the text closes exactly in budget;
    - slack up to :data:`CLOSE_WINDOW`: only tokens that leave a close in reach: the path's next, tokens made of
      neutral bytes (after which the same path still closes: string content), and tokens after which a tail of
      the path still closes within budget;
    - beyond: the grammar's own mask.
    """

    def __init__(self, matcher: llguidance.LLMatcher, table: _TokenTable, vocab: int) -> None:
        self.matcher, self.table, self.vocab = matcher, table, vocab
        self._path: list[int] | None = None
        self._text = b""  # the path's bytes
        self._known = False
        self._eos = table.ll.eos_token

    def path(self) -> list[int] | None:
        """Tokens from here to a valid end, end-of-text token last; None where the search gave up."""
        if not self._known:
            text = self._search()
            self._path, self._text, self._known = (self._tokens(text) if text is not None else None), text or b"", True
        return self._path

    def advanced(self, token: int) -> None:
        """``token`` was accepted: the path stays right when it was its next token."""
        if self._known and self._path and self._path[0] == token:
            self._path, self._text = self._path[1:], self._text[len(self.table.data[token]) :]
        else:
            self.forget()

    def forget(self) -> None:
        self._path, self._known = None, False

    def text(self, path: list[int]) -> str:
        return self.table.ll.decode_str([t for t in path if t != self._eos])

    def fit(self, words: torch.Tensor, left: int) -> None:
        """Narrow this step's mask ``words`` so that a valid end stays within ``left`` tokens."""
        path = self.path()
        if path is None or left - len(path) > CLOSE_WINDOW:
            return
        if len(path) >= left:  # no slack: the path it is
            words.zero_()
            words[path[0] >> 5] = _bit(path[0])
            return
        allowed = np.unpackbits(words.numpy().view(np.uint8), bitorder="little")[: self.vocab].astype(bool)
        keep = self._keep(allowed, path, left)
        keep[path[0]] = True
        packed = np.packbits(keep & allowed, bitorder="little")
        row = np.zeros(words.numel() * 4, dtype=np.uint8)
        row[: packed.size] = packed
        words.copy_(torch.from_numpy(row.view(np.int32)))

    def _keep(self, allowed: np.ndarray, path: list[int], left: int) -> np.ndarray:
        """The allowed tokens after which a valid end is still within ``left - 1`` tokens."""
        m, table, n = self.matcher, self.table, len(path)
        neutral = np.zeros(4, dtype=np.uint64)  # bytes after which this same path still ends the text
        for b, t in enumerate(table.byte_token):
            if t is not None and allowed[t] and t != path[0] and m.validate_tokens([t, *path]) == n + 1:
                neutral[b >> 6] |= np.uint64(1) << np.uint64(b & 63)
        bits, outside = table.bits[: self.vocab], ~neutral
        stray = (bits[:, 0] & outside[0]) | (bits[:, 1] & outside[1]) | (bits[:, 2] & outside[2])
        keep = ((stray | (bits[:, 3] & outside[3])) == 0) & ~table.empty[: self.vocab]
        # Any other token that starts like the path (a quote, then content): the rest of the path must end it.
        tails: dict[int, list[int]] = {}
        for t in np.flatnonzero(allowed & ~keep)[:_MAX_CHECKED].tolist():
            j = _common(table.data[t], self._text)
            if j not in tails:
                tails[j] = [*table.ll.tokenize_bytes(self._text[j:]), self._eos]
            tail = tails[j]
            keep[t] = len(tail) < left and m.validate_tokens([t, *tail]) == len(tail) + 1
        return keep

    def _search(self) -> bytes | None:
        """The bytes of a short way from here to a valid end (the matcher is left where it was)."""
        m, table = self.matcher, self.table
        out, taken = bytearray(), 0
        try:
            while len(out) <= _CLOSE_MAX_BYTES:
                if m.is_accepting():
                    return bytes(out)
                forced = m.compute_ff_bytes()
                if forced:
                    ids = table.ll.tokenize_bytes(forced)
                    if m.try_consume_tokens(ids) != len(ids):
                        return None
                    out, taken = out + forced, taken + len(ids)
                    continue
                step = self._step(m.compute_bitmask())
                if step is None:
                    return None
                out.append(step)
                taken += 1
            return None
        finally:
            m.rollback(taken)

    def _step(self, mask: bytes) -> int | None:
        """Consume the next byte of the close: the first in priority order that changes the state; its value."""
        m, first = self.matcher, None
        for b in _PRIORITY:
            t = self.table.byte_token[b]
            if t is None or not _allowed(mask, t):
                continue
            first = b if first is None else first
            m.consume_token(t)
            if m.is_accepting() or m.compute_bitmask() != mask:
                return b
            m.rollback(1)
        if first is None:
            return None
        m.consume_token(self.table.byte_token[first])  # only content bytes: any of them
        return first

    def _tokens(self, text: bytes) -> list[int] | None:
        """``text`` as tokens with the end-of-text token last, checked against the grammar."""
        ids = [*self.table.ll.tokenize_bytes(text), self._eos]
        return ids if self.matcher.validate_tokens(ids) == len(ids) else None


def _common(a: bytes, b: bytes) -> int:
    """The length of the common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _bit(token: int) -> int:
    """Bit ``token % 32`` of an int32 word, as a Python int that fits in one."""
    bit = 1 << (token & 31)
    return bit - (1 << 32) if bit >= 1 << 31 else bit
