"""Structured output: grammars, the masked sampling loop, schema-valid output from a real model."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Literal

import jsonschema
import pydantic
import pytest
import torch

from forge import Forge
from forge.config import ModelConfig
from forge.core.decode import Batcher, Sequence
from forge.core.sampling import SamplingParams, apply_token_bitmask
from forge.core.transformer import Transformer
from forge.engine import Engine
from forge.errors import ConfigError, GenerationError
from forge.generator import GenerationConfig, Generator
from forge.structured import Constraint, Grammar, SchemaLimits, output_spec
from forge.tokenizer import Tokenizer
from forge.toolcalls import ToolCall, ToolCallParser, ToolFormat

# -- without a pretrained model: a random model must still produce valid output --------------------------------------
SMALL_SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}}},
    },
    "required": ["kind", "legs", "tags"],
}


@pytest.fixture(scope="module")
def random_gen(bpe_tokenizer: Tokenizer, small_config: Callable[..., ModelConfig]) -> Generator:
    """A random 2-layer model: its preferences are noise, so only the mask keeps its output valid."""
    torch.manual_seed(0)
    cfg = small_config("llama", vocab_size=bpe_tokenizer.vocab_size, context_length=256)
    return Generator(Transformer(cfg), bpe_tokenizer)


def test_bitmask_masks_exactly_the_cleared_bits() -> None:
    logits = torch.zeros(2, 40)
    words = torch.tensor([[0b101, 1 << 7], [-1, 0]], dtype=torch.int32)  # row 0: tokens 0, 2, 39; row 1: 0..31
    out = apply_token_bitmask(logits, words)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [0, 2, 39]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == list(range(32))


def test_a_random_model_writes_valid_json_for_every_sample(random_gen: Generator) -> None:
    spec = output_spec(SMALL_SCHEMA)
    results = random_gen.complete(["{"] * 8, grammar=spec.grammar, temperature=1.0, seed=3, max_tokens=120)
    for r in results:
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), SMALL_SCHEMA)
        assert r.text == json.dumps(json.loads(r.text))  # the fixed layout: json.dumps's separators
    assert len({r.text for r in results}) > 1  # sampled, not one forced string


def test_regex_and_greedy_and_penalties(random_gen: Generator) -> None:
    spec = output_spec(r"[A-Z][a-z]{2,6} [0-9]{2}")
    for options in ({"temperature": 0}, {"temperature": 0.9, "repetition_penalty": 1.3, "presence_penalty": 1.0}):
        text = random_gen.generate("x", grammar=spec.grammar, seed=1, max_tokens=20, **options)
        assert re.fullmatch(r"[A-Z][a-z]{2,6} [0-9]{2}", spec.parse(text)), text


def test_the_batching_engine_masks_each_row_by_its_own_grammar(random_gen: Generator) -> None:
    tokenizer, model = random_gen.tokenizer, random_gen.model
    vocab = model.config.vocab_size
    batcher = Batcher(model, max_batch=3, max_len=128, vocab_limit=tokenizer.vocab_size)
    grammars = [Grammar.regex("(yes|no)"), Grammar.json_schema(SMALL_SCHEMA), None]
    seqs = []
    for i, g in enumerate(grammars):
        gen = torch.Generator().manual_seed(i)
        c = Constraint(g, tokenizer, vocab) if g is not None else None
        seqs.append(
            Sequence(tokenizer.encode("a"), 100, SamplingParams(temperature=1.0), gen, tokenizer.stop_ids, None, c)
        )
    out: dict[int, list[int]] = {i: [] for i in range(3)}
    pending = {id(s): i for i, s in enumerate(seqs)}
    results = batcher.add_many(seqs)
    while True:
        for r in results:
            i = pending[id(r.seq)]
            if r.token not in tokenizer.stop_ids:
                out[i].append(r.token)
            if r.finished:
                batcher.remove(r.seq)
        if not batcher.running:
            break
        results = batcher.step()
    assert tokenizer.decode(out[0]) in ("yes", "no")
    jsonschema.validate(json.loads(tokenizer.decode(out[1])), SMALL_SCHEMA)
    assert len(out[2]) == 100  # the free row was not touched by the others' masks


def test_output_cut_by_max_tokens_is_an_error_not_invalid_json(random_gen: Generator) -> None:
    spec = output_spec({"type": "array", "items": {"type": "integer"}, "minItems": 30})
    with pytest.raises(GenerationError, match=r"max_tokens=5 cannot hold .* at least \d+"):  # refused at once
        random_gen.complete("[", grammar=spec.grammar, temperature=1.0, seed=0, max_tokens=5)
    unwatched = dataclasses.replace(spec.grammar, close_in_budget=False)  # the budget not watched: cut short
    completion = random_gen.complete("[", grammar=unwatched, temperature=1.0, seed=0, max_tokens=5)[0]
    assert completion.finish_reason == "length"
    with pytest.raises(GenerationError, match="max_tokens"):
        spec.parse(completion.text, completion.finish_reason)


def test_bad_schemas_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="JSON schema is invalid"):
        output_spec({"type": "object", "properties": {"a": {"type": "integr"}}})
    with pytest.raises(ConfigError, match="not supported"):
        output_spec(42)
    with pytest.raises(ConfigError, match="regex"):
        Grammar.regex("")
    with pytest.raises(ConfigError, match="grammar"):
        Grammar.lark("start: undefined_rule")


# -- tool-call formats ----------------------------------------------------------------------------------------------
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {f: {"type": "integer", "minimum": 0, "maximum": 99} for f in "ab"},
            },
        },
    },
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]


def test_the_parser_reads_calls_split_anywhere() -> None:
    fmt = ToolFormat()
    calls = [ToolCall("add", {"a": 1, "b": {"x": '}]\\"{'}}), ToolCall("now", {})]  # braces inside strings
    text = "\n".join(fmt.call_text(c) for c in calls)
    for size in (1, 2, 3, 7, len(text)):
        parser = ToolCallParser(fmt)
        deltas = [d for i in range(0, len(text), size) for d in parser.feed(text[i : i + size])]
        deltas += list(parser.finish())
        assert [(c.name, c.arguments) for c in parser.calls] == [(c.name, c.arguments) for c in calls]
        assert [d[3] for d in deltas if d[0] == "call"] == ["add", "now"]
        for index, call in enumerate(calls):
            streamed = "".join(d[2] for d in deltas if d[0] == "arguments" and d[1] == index)
            assert json.loads(streamed) == call.arguments
        assert parser.content is None
    assert fmt.parse("Just <b>text</b>, no call.") == ("Just <b>text</b>, no call.", [])
    assert fmt.parse("<tool") == ("<tool", [])
    assert fmt.parse("\n<tool_call>{") == ("\n<tool_call>{", [])  # the grammar's text: it does not open a call


def test_the_parser_merges_identical_calls() -> None:
    """SmolLM2 under parallel calls writes one call three times: it is one call, streamed once."""
    fmt = ToolFormat()
    add, now = ToolCall("add", {"a": 1, "b": 2}), ToolCall("now", {})
    same_keys_reordered = '<tool_call>{"name": "add", "arguments": {"b": 2, "a": 1}}</tool_call>'
    text = "\n".join([fmt.call_text(add), fmt.call_text(add), same_keys_reordered, fmt.call_text(now)])
    for size in (1, 5, len(text)):
        parser = ToolCallParser(fmt)
        deltas = [d for i in range(0, len(text), size) for d in parser.feed(text[i : i + size])]
        deltas += list(parser.finish())
        assert [(c.name, c.arguments) for c in parser.calls] == [("add", {"a": 1, "b": 2}), ("now", {})]
        assert [(d[1], d[3]) for d in deltas if d[0] == "call"] == [(0, "add"), (1, "now")]
        assert [d[2] for d in deltas if d[0] == "call"] == [c.id for c in parser.calls]
        for index, call in enumerate(parser.calls):
            streamed = "".join(d[2] for d in deltas if d[0] == "arguments" and d[1] == index)
            assert json.loads(streamed) == call.arguments
    assert len(fmt.parse("\n".join([fmt.call_text(add)] * 3))[1]) == 1


def test_tool_grammars_admit_exactly_the_format(random_gen: Generator) -> None:
    fmt = ToolFormat()
    required = fmt.grammar(TOOLS, "required")
    for seed in range(4):
        text = random_gen.generate("x", grammar=required, temperature=1.0, seed=seed, max_tokens=60)
        content, calls = fmt.parse(text)
        assert content is None and len(calls) == 1 and calls[0].name in ("add", "now"), text
        if calls[0].name == "add":
            jsonschema.validate(calls[0].arguments, TOOLS[0]["function"]["parameters"])
    named = random_gen.generate("x", grammar=fmt.grammar(TOOLS, "now"), temperature=1.0, seed=0, max_tokens=60)
    assert fmt.parse(named)[1][0].name == "now"
    with pytest.raises(ConfigError, match="tool_choice names 'nope'"):
        fmt.grammar(TOOLS, "nope")
    with pytest.raises(ConfigError, match="must be"):
        fmt.grammar([{"type": "function", "function": {"name": "bad name!"}}])


QWEN_LIKE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}"
    "{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    '{# calls look like {"name": ..., "arguments": ...} #}'
)
LLAMA_LIKE = '{% if tools %}Use {"name": function name, "parameters": dict}{% endif %}{{ messages[-1].content }}'


def test_formats_come_from_the_chat_template() -> None:
    assert ToolFormat.for_template(None) == ToolFormat()
    assert ToolFormat.for_template("{{ messages }}") == ToolFormat()
    assert ToolFormat.for_template(QWEN_LIKE) == ToolFormat("<tool_call>", "</tool_call>", "arguments", native=True)
    assert ToolFormat.for_template(LLAMA_LIKE) == ToolFormat("", "", "parameters", native=True)
    raw = ToolFormat.for_template(LLAMA_LIKE)
    assert raw.parse(raw.call_text(ToolCall("now", {})))[1][0].name == "now"


def test_chat_rendering_with_native_and_default_formats() -> None:
    from forge.chat import render_chat

    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    messages = [
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]
    native = render_chat(QWEN_LIKE, messages, tools=TOOLS)
    assert '<tools>{"type": "function", "function": {"name": "add"' in native  # the template's own rendering
    assert '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>' in native
    default = render_chat(None, messages, tools=TOOLS)
    assert default.startswith("System: You are a function calling AI model.")
    assert 'Assistant: <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>' in default
    # The result in a user turn, named, then the question again (SmolLM2 answers from it; see chat._for_template).
    assert "User: The tool add returned: 3\n\nUsing this result, answer: 1+2?" in default
    two = [*messages[:1], {**messages[1], "tool_calls": [call, {**call, "id": "c2"}]}, messages[2]]
    two.append({"role": "tool", "tool_call_id": "c2", "name": "add", "content": "4"})
    assert "User: The tool add returned: 3\nThe tool add returned: 4\n\nUsing" in render_chat(None, two)
    with pytest.raises(ConfigError, match="malformed tool call"):
        render_chat(None, [{"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}])


# -- SmolLM2: 100 constrained generations over varied schemas, all valid -------------------------------------------
class Address(pydantic.BaseModel):
    street: Annotated[str, pydantic.Field(max_length=40)]
    city: Annotated[str, pydantic.Field(max_length=30)]
    postcode: Annotated[str, pydantic.Field(pattern=r"^[0-9]{5}$")]


class Customer(pydantic.BaseModel):
    name: Annotated[str, pydantic.Field(max_length=40)]
    tier: Literal["free", "pro", "enterprise"]
    address: Address
    nickname: Annotated[str, pydantic.Field(max_length=20)] | None = None
    orders: Annotated[list[Annotated[int, pydantic.Field(ge=1, le=9999)]], pydantic.Field(max_length=4)]


def _text(n: int) -> dict[str, object]:
    return {"type": "string", "maxLength": n}


SCHEMAS: list[tuple[str, str, object]] = [
    ("a nested customer record (pydantic)", "Write a customer record as JSON.", Customer),
    (
        "enums",
        "Describe a T-shirt as JSON.",
        {
            "type": "object",
            "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L", "XL"]}},
            "required": ["color", "size"],
        },
    ),
    (
        "bounded numbers",
        "Give the weather as JSON.",
        {
            "type": "object",
            "properties": {
                "temperature": {"type": "number", "minimum": -40, "maximum": 50},
                "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
                "wind_kmh": {"type": "integer", "exclusiveMinimum": 0, "maximum": 200},
            },
            "required": ["temperature", "humidity", "wind_kmh"],
        },
    ),
    (
        "arrays with bounds",
        "List some prime numbers and fruits as JSON.",
        {
            "type": "object",
            "properties": {
                "primes": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 2, "maximum": 97},
                    "minItems": 2,
                    "maxItems": 5,
                },
                "fruits": {"type": "array", "items": _text(15), "maxItems": 3},
            },
            "required": ["primes", "fruits"],
        },
    ),
    (
        "optional fields",
        "Describe a book as JSON.",
        {
            "type": "object",
            "properties": {
                "title": _text(40),
                "year": {"type": "integer", "minimum": 1400, "maximum": 2026},
                "subtitle": _text(40),
                "pages": {"type": "integer", "minimum": 1, "maximum": 5000},
            },
            "required": ["title"],
        },
    ),
    (
        "an array of objects",
        "List a few planets as JSON.",
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": _text(12), "moons": {"type": "integer", "minimum": 0, "maximum": 150}},
                "required": ["name", "moons"],
            },
            "minItems": 1,
            "maxItems": 3,
        },
    ),
    (
        "patterns",
        "Give an event as JSON.",
        {
            "type": "object",
            "properties": {
                "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
                "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
            },
            "required": ["date", "code"],
        },
    ),
    (
        "anyOf, booleans, null and const",
        "Describe a feature flag as JSON.",
        {
            "type": "object",
            "properties": {
                "version": {"const": 2},
                "enabled": {"type": "boolean"},
                "rollout": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100}, {"type": "null"}]},
                "owner": {"anyOf": [_text(20), {"type": "null"}]},
            },
            "required": ["version", "enabled", "rollout", "owner"],
        },
    ),
    (
        "deep nesting",
        "Describe a company as JSON.",
        {
            "type": "object",
            "properties": {
                "company": {
                    "type": "object",
                    "properties": {
                        "name": _text(30),
                        "ceo": {
                            "type": "object",
                            "properties": {"name": _text(30), "age": {"type": "integer", "minimum": 18, "maximum": 99}},
                            "required": ["name", "age"],
                        },
                    },
                    "required": ["name", "ceo"],
                }
            },
            "required": ["company"],
        },
    ),
    (
        "a top-level enum of strings",
        "Is the sky blue? Answer as JSON.",
        {"enum": ["yes", "no", "sometimes"]},
    ),
]


@pytest.fixture(scope="module")
def smol(smollm2_app: Forge) -> Forge:
    return smollm2_app


def test_100_constrained_generations_from_smollm2_are_all_valid(smol: Forge) -> None:
    """10 schemas x 10 sampled generations: every one completes and validates, checked by jsonschema itself."""
    assert smol.model is not None and smol.tokenizer is not None
    generator = Generator(smol.model, smol.tokenizer)
    valid, seen = 0, []
    for i, (what, question, schema) in enumerate(SCHEMAS):
        spec = output_spec(schema)
        prompt = smol.render([{"role": "user", "content": question}])
        results = generator.complete([prompt] * 10, grammar=spec.grammar, temperature=0.8, seed=i, max_tokens=200)
        json_schema = schema.model_json_schema() if isinstance(schema, type) else schema
        for r in results:
            assert r.finish_reason == "stop", f"{what}: {r.text!r}"
            value = json.loads(r.text)
            jsonschema.validate(value, json_schema)
            spec.parse(r.text)  # and Forge's own parse agrees (a pydantic instance for Customer)
            valid += 1
        seen.append(len({r.text for r in results}))
    assert valid == 100
    assert sum(seen) > 50, f"distinct outputs per schema {seen}: sampling should vary them"


def test_app_generate_and_chat_return_validated_values(smol: Forge) -> None:
    customer = smol.sync.chat("Write a customer record as JSON.", schema=Customer, temperature=0, max_tokens=200)
    assert isinstance(customer, Customer) and customer.tier in ("free", "pro", "enterprise")
    year = smol.sync.generate("Shakespeare was born in the year", schema=r" ?1[0-9]{3}", temperature=0, max_tokens=6)
    assert re.fullmatch(r" ?1[0-9]{3}", year)
    shirts = asyncio.run(
        smol.generate(["A red shirt:", "A blue shirt:"], schema=SCHEMAS[1][2], temperature=0, max_tokens=30)
    )
    assert all(s["color"] in ("red", "green", "blue") for s in shirts)
    with pytest.raises(GenerationError, match="max_tokens"):
        smol.sync.chat("Write a customer record as JSON.", schema=Customer, temperature=0, max_tokens=5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_masks_apply_on_cuda_in_the_generator_and_the_engine(small_config: Callable[..., ModelConfig]) -> None:
    bpe_tokenizer = Tokenizer.train([json.dumps(SMALL_SCHEMA) * 20], vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(small_config("llama", vocab_size=bpe_tokenizer.vocab_size, context_length=256)).cuda()
    gen = Generator(model, bpe_tokenizer, dtype=torch.bfloat16)
    spec = output_spec(SMALL_SCHEMA)
    for options in ({"temperature": 0}, {"temperature": 1.0, "seed": 2}):  # both replay a logits graph on CUDA
        for r in gen.complete(["{"] * 4, grammar=spec.grammar, max_tokens=120, **options):
            assert r.finish_reason == "stop", r.text
            jsonschema.validate(json.loads(r.text), SMALL_SCHEMA)

    async def engine_run() -> list[str]:
        engine = Engine(gen.model, bpe_tokenizer, max_batch=4).start()
        try:
            cfg = GenerationConfig(grammar=spec.grammar, temperature=1.0, max_tokens=120)
            streams = [engine.stream("{", cfg.replace(seed=i)) for i in range(4)]

            async def text(stream: AsyncIterator[str]) -> str:
                return "".join([piece async for piece in stream])

            return list(await asyncio.gather(*(text(s) for s in streams)))
        finally:
            await engine.stop()

    for text in asyncio.run(engine_run()):
        jsonschema.validate(json.loads(text), SMALL_SCHEMA)


# -- hostile schemas: clear ConfigErrors, never RecursionError / ValueError / llguidance's internal state --------------


def _nested(levels: int) -> dict[str, object]:
    schema: dict[str, object] = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        (_nested(150), "nested more than 64 levels"),
        ({"type": "integer", "minimum": 2**64}, "does not fit in 64 bits"),
        ({"enum": [1, -(2**70)]}, "does not fit in 64 bits"),
        ({"const": 2**64}, "does not fit in 64 bits"),
    ],
)
def test_hostile_schemas_are_config_errors(schema: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        Grammar.json_schema(schema)
    with pytest.raises(ConfigError, match=words):  # a tool's parameters take the same path
        ToolFormat().grammar([{"type": "function", "function": {"name": "f", "parameters": schema}}])


def test_schema_limits_bound_size_properties_and_depth() -> None:
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(50)}}
    SchemaLimits().check(wide)
    with pytest.raises(ConfigError, match="50 properties; at most 10"):
        SchemaLimits(max_properties=10).check(wide)
    with pytest.raises(ConfigError, match="bytes as JSON; at most 100"):
        SchemaLimits(max_bytes=100).check(wide)
    with pytest.raises(ConfigError, match="nested more than 3"):
        SchemaLimits(max_depth=3).check(_nested(3))


def test_a_recursive_ref_is_a_clean_error(bpe_tokenizer: Tokenizer) -> None:
    grammar = Grammar.json_schema(
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    )
    with pytest.raises(ConfigError, match="no base case") as e:
        Constraint(grammar, bpe_tokenizer, bpe_tokenizer.vocab_size)
    assert "<state>" not in e.value.message and "grammars" not in e.value.message  # llguidance's internals stay in


def test_constraints_copy_a_compiled_grammar(bpe_tokenizer: Tokenizer) -> None:
    grammar = Grammar.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    first = Constraint(grammar, bpe_tokenizer, bpe_tokenizer.vocab_size)
    second = Constraint(grammar, bpe_tokenizer, bpe_tokenizer.vocab_size)
    assert first.matcher is not second.matcher  # each sequence has its own state
    first.accept(bpe_tokenizer.encode("{")[0])
    assert not second.matcher.is_error() and not first.matcher.is_error()
