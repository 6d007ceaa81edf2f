"""Budget-aware grammars: a schema reply always ends validly within max_tokens when the shortest valid one fits.

The schemas invite endless output (free strings, lists with no maxItems, nested objects). A random model
writes noise, so only the constraint can end its text; SmolLM2 at temperature 0.8 writes long strings of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
import torch

from forge import Forge
from forge.config import ModelConfig
from forge.core.transformer import Transformer
from forge.engine import Engine
from forge.errors import GenerationError
from forge.generator import GenerationConfig, Generator
from forge.structured import Constraint, Grammar, output_spec
from forge.tokenizer import Tokenizer
from forge.toolcalls import ToolFormat

FREE_STRING = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
STRING_LIST = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "tags"],
}
NESTED = {
    "type": "object",
    "properties": {
        "company": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "people": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "notes": {"type": "array", "items": {}}},
                        "required": ["name", "notes"],
                    },
                },
            },
            "required": ["name", "people"],
        }
    },
    "required": ["company"],
}
ENDLESS = [FREE_STRING, STRING_LIST, NESTED]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "sites": {"type": "array", "items": {"type": "string"}}},
                "required": ["query", "sites"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def noise(bpe_tokenizer: Tokenizer, small_config: Callable[..., ModelConfig]) -> Generator:
    """A random model over a BPE vocabulary: it never closes a string of its own accord."""
    torch.manual_seed(0)
    cfg = small_config("llama", vocab_size=bpe_tokenizer.vocab_size, context_length=256)
    return Generator(Transformer(cfg), bpe_tokenizer)


def _shortest(grammar: Grammar, tokenizer: Tokenizer, vocab: int) -> int:
    """The tokens of the shortest valid output, found by refusing ever smaller budgets."""
    budget = 1
    while True:
        try:
            Constraint(grammar, tokenizer, vocab, budget)
            return budget
        except GenerationError:
            budget += 1


@pytest.mark.parametrize("schema", ENDLESS, ids=["free_string", "string_list", "nested"])
def test_endless_schemas_end_validly_within_small_budgets(noise: Generator, schema: dict[str, Any]) -> None:
    spec = output_spec(schema)
    cut = noise.complete(["{"] * 4, grammar=dataclasses.replace(spec.grammar, close_in_budget=False), **_sampled(30))
    assert all(r.finish_reason == "length" for r in cut)  # unwatched, the noise never ends: the test can fail
    shortest = _shortest(spec.grammar, noise.tokenizer, noise.model.config.vocab_size)
    for budget in (shortest, shortest + 4, shortest + 24):
        for r in noise.complete(["{"] * 3, grammar=spec.grammar, **_sampled(budget)):
            assert r.finish_reason == "stop", (budget, r.text)
            assert r.completion_tokens < budget  # the end-of-text token took the last place
            jsonschema.validate(spec.parse(r.text), schema)


def test_a_budget_below_the_shortest_output_is_refused_with_the_size_needed(noise: Generator) -> None:
    spec = output_spec(NESTED)
    shortest = _shortest(spec.grammar, noise.tokenizer, noise.model.config.vocab_size)
    assert shortest > 5
    with pytest.raises(GenerationError, match=rf"max_tokens={shortest - 1} cannot hold .* at least {shortest}$"):
        noise.complete("{", grammar=spec.grammar, **_sampled(shortest - 1))


def test_tool_calls_end_validly_within_small_budgets(noise: Generator) -> None:
    fmt = ToolFormat()
    grammar = fmt.grammar(TOOLS, "required")
    parameters = TOOLS[0]["function"]["parameters"]
    shortest = _shortest(grammar, noise.tokenizer, noise.model.config.vocab_size)
    for budget in (shortest, shortest + 6):
        for r in noise.complete(["x"] * 2, grammar=grammar, **_sampled(budget)):
            assert r.finish_reason == "stop", (budget, r.text)
            content, calls = fmt.parse(r.text)
            assert [c.name for c in calls] == ["search"] and not content
            jsonschema.validate(calls[0].arguments, parameters)


def test_the_batching_engine_watches_each_rows_budget(noise: Generator) -> None:
    spec = output_spec(STRING_LIST)

    async def run() -> list[str]:
        engine = Engine(noise.model, noise.tokenizer, max_batch=4).start()
        try:
            cfg = GenerationConfig(grammar=spec.grammar, temperature=1.0, max_tokens=20)
            streams = [engine.stream("{", cfg.replace(seed=i, max_tokens=24 + 4 * i)) for i in range(4)]
            return [await _join(s) for s in streams]
        finally:
            await engine.stop()

    for text in asyncio.run(run()):
        jsonschema.validate(json.loads(text), STRING_LIST)


def test_rollback_takes_back_tokens_and_the_budget(noise: Generator) -> None:
    tokenizer, vocab = noise.tokenizer, noise.model.config.vocab_size
    constraint = Constraint(output_spec(FREE_STRING).grammar, tokenizer, vocab, 40)
    ids = tokenizer.encode('{"city": "ab')
    for token in ids:
        constraint.accept(token)
    constraint.rollback(2)
    assert constraint.used == len(ids) - 2
    for token in ids[-2:]:  # the same tokens are valid again
        constraint.accept(token)
    for token in tokenizer.encode('"}'):
        constraint.accept(token)
    assert constraint.complete


# -- SmolLM2 at temperature 0.8: it writes long strings and lists when let ------------------------------------------
@pytest.mark.parametrize("schema", ENDLESS, ids=["free_string", "string_list", "nested"])
def test_smollm2_sampled_replies_always_parse_in_small_budgets(smollm2_app: Forge, schema: dict[str, Any]) -> None:
    assert smollm2_app.model is not None and smollm2_app.tokenizer is not None
    generator = Generator(smollm2_app.model, smollm2_app.tokenizer)
    prompt = smollm2_app.render([{"role": "user", "content": "Describe New York at length, as JSON."}])
    spec = output_spec(schema)
    for r in generator.complete([prompt] * 4, grammar=spec.grammar, **_sampled(40, 0.8)):
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(spec.parse(r.text), schema)


def test_smollm2_tool_calls_always_parse_in_small_budgets(smollm2_app: Forge) -> None:
    assert smollm2_app.model is not None and smollm2_app.tokenizer is not None
    generator = Generator(smollm2_app.model, smollm2_app.tokenizer)
    fmt = ToolFormat.for_template(smollm2_app.tokenizer.chat_template)
    question = [{"role": "user", "content": "Search the web for the history of New York, on several sites."}]
    prompt = smollm2_app.render(question, tools=TOOLS)
    for r in generator.complete([prompt] * 4, grammar=fmt.grammar(TOOLS, "required"), **_sampled(30, 0.8)):
        assert r.finish_reason == "stop", r.text
        content, calls = fmt.parse(r.text)
        assert [c.name for c in calls] == ["search"] and not content
        jsonschema.validate(calls[0].arguments, TOOLS[0]["function"]["parameters"])


def _sampled(budget: int, temperature: float = 1.0) -> dict[str, Any]:
    return {"temperature": temperature, "seed": budget, "max_tokens": budget}


async def _join(stream: Any) -> str:
    return "".join([piece async for piece in stream])
