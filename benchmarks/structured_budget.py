"""Structured output that always completes: parse-and-validate rate within max_tokens, budget-aware against not.

Prints JSON. 10 schemas that invite endless output (free strings, lists with
no maxItems, nested objects, a tool call), 10 sampled generations each at
temperature 0.8 with SmolLM2-135M-Instruct and ``max_tokens`` 120: once with
the budget-aware grammar (Forge's default) and once with the budget unwatched
(``Grammar.close_in_budget=False``, the baseline), same prompts and seeds,
same run. A generation counts when it stopped on its own and its text parses
and validates against the schema (jsonschema), or for the tool call, parses
into a call whose arguments validate.

    python benchmarks/structured_budget.py               # saves benchmarks/results/structured_budget_cpu.json
    python benchmarks/structured_budget.py --samples 2   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, save_result
from forge import Forge, models
from forge.errors import GenerationError
from forge.generator import Generator
from forge.structured import output_spec
from forge.toolcalls import ToolFormat


def _str() -> dict[str, str]:
    return {"type": "string"}


def _obj(required: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": required, "required": list(required)}


def _list(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


SEARCH = {"query": _str(), "sites": _list(_str())}
TOOLS = [{"type": "function", "function": {"name": "search", "parameters": _obj(SEARCH)}}]
#: (name, question, schema); the last is the tool call.
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("free_string", "Describe New York in detail, as JSON.", _obj({"city": _str()})),
    ("two_free_strings", "Write a long story, as JSON.", _obj({"title": _str(), "story": _str()})),
    ("string_list", "List every tag for Paris, as JSON.", _obj({"city": _str(), "tags": _list(_str())})),
    ("list_of_strings_top", "List many fruits, as a JSON array.", _list(_str())),
    ("integer_list", "List the first hundred primes, as JSON.", _obj({"primes": _list({"type": "integer"})})),
    (
        "nested_objects",
        "Describe a company and all its people, as JSON.",
        _obj({"company": _obj({"name": _str(), "ceo": _obj({"name": _str(), "bio": _str()})})}),
    ),
    (
        "list_of_objects",
        "List all the planets with notes, as JSON.",
        _obj({"planets": _list(_obj({"name": _str(), "notes": _str()}))}),
    ),
    ("nested_lists", "Write a big table of words, as JSON.", _obj({"rows": _list(_list(_str()))})),
    ("free_object", "Describe a car with many fields, as JSON.", {"type": "object"}),
    ("tool_call", "Search the web for the history of New York, on several sites.", _obj(SEARCH)),
]


def valid(name: str, schema: dict[str, Any], text: str, finish: str, fmt: ToolFormat) -> bool:
    """Whether the reply stopped on its own and parses and validates."""
    if finish != "stop":
        return False
    try:
        if name == "tool_call":
            content, calls = fmt.parse(text)
            if content or len(calls) != 1:
                return False
            jsonschema.validate(calls[0].arguments, schema)
        else:
            jsonschema.validate(output_spec(schema).parse(text), schema)
    except (ValueError, jsonschema.ValidationError, GenerationError):
        return False
    return True


def run(app: Forge, generator: Generator, watched: bool, samples: int, max_tokens: int) -> dict[str, Any]:
    assert app.tokenizer is not None
    fmt = ToolFormat.for_template(app.tokenizer.chat_template)
    per_case: dict[str, Any] = {}
    total_ok = total = 0
    start = time.perf_counter()
    for i, (name, question, schema) in enumerate(CASES):
        messages = [{"role": "user", "content": question}]
        if name == "tool_call":
            grammar, prompt = fmt.grammar(TOOLS, "required"), app.render(messages, tools=TOOLS)
        else:
            grammar, prompt = output_spec(schema).grammar, app.render(messages)
        grammar = grammar if watched else dataclasses.replace(grammar, close_in_budget=False)
        results = generator.complete(
            [prompt] * samples, grammar=grammar, temperature=0.8, seed=i, max_tokens=max_tokens
        )
        ok = [valid(name, schema, r.text, r.finish_reason, fmt) for r in results]
        per_case[name] = {
            "valid": sum(ok),
            "of": len(ok),
            "mean_tokens": sum(r.completion_tokens for r in results) / len(results),
            "failed_example": next((r.text[-80:] for r, good in zip(results, ok, strict=True) if not good), None),
        }
        total_ok, total = total_ok + sum(ok), total + len(ok)
        mode = "budget-aware" if watched else "baseline"
        print(f"{mode} {name}: {sum(ok)}/{len(ok)} valid", file=sys.stderr, flush=True)  # progress of a long run
    return {
        "valid": total_ok,
        "of": total,
        "rate": total_ok / total,
        "seconds": round(time.perf_counter() - start, 1),
        "cases": per_case,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--save", default="structured_budget_cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    app = Forge.load(models.locate("smollm2"))
    assert app.model is not None and app.tokenizer is not None
    generator = Generator(app.model, app.tokenizer)
    out = {
        "benchmark": "structured_budget",
        "model": "SmolLM2-135M-Instruct",
        "temperature": 0.8,
        "max_tokens": args.max_tokens,
        "samples_per_schema": args.samples,
        "budget_aware": run(app, generator, True, args.samples, args.max_tokens),
        "baseline_unwatched": run(app, generator, False, args.samples, args.max_tokens),
        "environment": environment(torch.device("cpu")),
    }
    if args.samples == 10:
        save_result(args.save, out)
    else:  # a quick look is not the benchmark: printed, not saved
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
