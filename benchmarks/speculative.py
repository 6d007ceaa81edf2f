"""N-gram speculative decoding against plain decoding: input-grounded prompts and open ones.

Prints JSON and saves it under benchmarks/results/. SmolLM2-135M-Instruct, greedy, each prompt
decoded by the same token loop (``forge.core.decode.Batcher``, one row, eager) twice: plain (the
baseline) and with ``speculate``. Reported per prompt and per kind: decode tokens/s (prefill
excluded), the speedup, the acceptance rate, and whether the tokens are identical.

* grounded: answers that quote or edit their input (a RAG answer quoting its sources, an edit of
  given code, a corrected paragraph): n-gram lookup finds the continuation in the prompt;
* open: free writing, where the prompt rarely predicts the text and speculation should stay out
  of the way (target: no more than 5% slower).

    python benchmarks/speculative.py                  # CPU
    python benchmarks/speculative.py --device cuda    # a GPU (bf16), eager steps on both sides
    python benchmarks/speculative.py --device cuda --graphs   # both sides replay CUDA graphs
    python benchmarks/speculative.py --draft smollm2   # also a draft model: the fp32 model, drafted by its
                                                      # int4 GGUF kept quantized (speculative_draft_*.json)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from _common import environment, save_result, sync
from forge.app import Forge
from forge.chat import render_chat
from forge.core.decode import Batcher, Sequence
from forge.core.sampling import SamplingParams
from forge.core.transformer import Transformer
from forge.draft import load_draft

SOURCES = (
    "[1] The Forge framework trains small language models on a laptop and serves them over an "
    "OpenAI-compatible HTTP API.\n[2] Its serving engine batches requests continuously: a request joins the "
    "running batch between two decode steps, and one that finishes leaves it.\n[3] Prefix caching keeps the "
    "keys and values of prompts already seen, so a request that shares a long system prompt starts from them."
)
CODE = """def moving_average(values, window):
    result = []
    for i in range(len(values) - window + 1):
        chunk = values[i : i + window]
        result.append(sum(chunk) / window)
    return result


def normalise(values):
    low, high = min(values), max(values)
    return [(v - low) / (high - low) for v in values]
"""
TYPOS = (
    "The comittee met on tuesday to discus the new budjet. After a long debate, the members agred to "
    "increase funding for the libary and to repair the roof of the comunity center before the winter."
)
PROMPTS = {
    "grounded": {
        "rag_quote": f"Sources:\n{SOURCES}\n\nQuestion: How does the serving engine batch requests, and what does "
        "prefix caching keep? Answer by quoting the sources word for word, with their numbers.",
        "code_edit": f"Rename the function moving_average to rolling_mean in this code and return the whole code "
        f"unchanged otherwise:\n\n{CODE}",
        "text_fix": f"Correct the spelling mistakes in this paragraph and return it in full:\n\n{TYPOS}",
    },
    "open": {
        "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "explain": "Explain to a child why the sky is blue.",
        "ideas": "Give me ten ideas for a birthday party for a seven-year-old.",
    },
}


def encode(app: Forge, text: str) -> list[int]:
    tok = app.tokenizer
    assert tok is not None
    special = {"bos_token": tok.bos, "eos_token": tok.eos}
    prompt = render_chat(tok.chat_template, [{"role": "user", "content": text}], special_tokens=special)
    return tok.encode_prompt(prompt)


#: Graph-replaying batchers, one per kind of run, and their cache length (every prompt here fits).
_KEPT: dict[tuple, Batcher] = {}
GRAPH_LEN = 1024


def decode(
    app: Forge,
    ids: list[int],
    speculate: bool,
    max_tokens: int,
    device: torch.device,
    draft: Transformer | None = None,
    graphs: bool = False,
) -> dict[str, Any]:
    """One greedy generation (``draft``: its proposals, else n-gram lookup's); decode seconds exclude the
    prefill and its first token. ``graphs`` (CUDA): a batcher that replays captured graphs, kept for the
    next generation of the same kind (plain: 8 greedy steps a replay; speculating: one verify a replay)."""
    assert app.model is not None and app.tokenizer is not None
    limit = app.tokenizer.vocab_size
    if graphs:
        key = ("speculative-benchmark", speculate, id(draft))
        if key not in _KEPT:
            _KEPT[key] = Batcher(app.model, max_batch=1, max_len=GRAPH_LEN, vocab_limit=limit, draft=draft, graphs=key)
        batcher = _KEPT[key]
    else:
        batcher = Batcher(app.model, max_batch=1, max_len=len(ids) + max_tokens, vocab_limit=limit, draft=draft)
    seq = Sequence(list(ids), max_tokens, SamplingParams(temperature=0), None, app.tokenizer.stop_ids)
    seq.speculate = speculate
    tokens = [r.token for r in [batcher.add(seq)]]
    sync(device)
    start = time.perf_counter()
    done = False
    while not done:
        for r in batcher.step():
            tokens.append(r.token)
            done = done or r.finished
    sync(device)
    seconds = time.perf_counter() - start
    batcher.clear()
    out: dict[str, Any] = {"tokens": tokens, "decode_tokens": len(tokens) - 1, "decode_s": seconds}
    out["decode_tok_s"] = out["decode_tokens"] / seconds if seconds > 0 else 0.0
    if seq.spec is not None:
        out |= {"proposed": seq.spec.proposed, "accepted": seq.spec.accepted, "verify_steps": seq.spec.steps}
    return out


def compare(app: Forge, ids: list[int], args: argparse.Namespace, drafts: dict[str, Transformer | None]) -> dict:
    """Plain decoding, then each speculative mode, on one prompt: the fastest of ``args.repeats`` runs each."""
    device = torch.device(args.device)
    g = args.graphs
    runs = {
        "plain": min(
            (decode(app, ids, False, args.max_tokens, device, None, g) for _ in range(args.repeats)), key=_secs
        )
    }
    for mode, draft in drafts.items():
        runs[mode] = min(
            (decode(app, ids, True, args.max_tokens, device, draft, g) for _ in range(args.repeats)), key=_secs
        )
    return runs


def _secs(run: dict[str, Any]) -> float:
    return float(run["decode_s"])


def _row(app: Forge, ids: list[int], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    plain = runs["plain"]
    row: dict[str, Any] = {"prompt_tokens": len(ids), "plain_tok_s": plain["decode_tok_s"]}
    for mode, run in runs.items():
        if mode == "plain":
            continue
        steps = max(1, run.get("verify_steps", 0))
        row |= {
            f"{mode}_identical": plain["tokens"] == run["tokens"],
            f"{mode}_tok_s": run["decode_tok_s"],
            f"{mode}_speedup": run["decode_tok_s"] / plain["decode_tok_s"],
            f"{mode}_acceptance": run.get("accepted", 0) / max(1, run.get("proposed", 0)),
            f"{mode}_tokens_per_verify": (run.get("accepted", 0) + run.get("verify_steps", 0)) / steps,
        }
    row["identical"] = all(v for k, v in row.items() if k.endswith("_identical"))
    row["decode_tokens"] = plain["decode_tokens"]
    row["text"] = app.tokenizer.decode(plain["tokens"])[:200]  # type: ignore[union-attr]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--draft", default=None, help="also speculate with this draft model (kept quantized)")
    parser.add_argument("--model", default="smollm2", help="the model: a known name or a path (default: smollm2)")
    parser.add_argument(
        "--graphs", action="store_true", help="CUDA: both sides replay captured graphs, as forge generate does there"
    )
    args = parser.parse_args()
    if args.graphs and args.device != "cuda":
        raise SystemExit("--graphs: CUDA graphs need --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # With a draft: the float model is the target (bf16 on a GPU, fp32 on a CPU) and the GGUF kept int4 drafts.
    dtype = "bfloat16" if device.type == "cuda" else ("float32" if args.draft else None)
    app = Forge.load(args.model, device=args.device, dtype=dtype)
    assert app.tokenizer is not None
    drafts: dict[str, Transformer | None] = {"ngram": None}
    if args.draft:
        drafts["draft"] = load_draft(args.draft, app.tokenizer, device)
    result: dict[str, Any] = {"benchmark": "speculative", "max_tokens": args.max_tokens, "draft": args.draft}
    result["kinds"] = {}
    result["graphs"] = args.graphs
    for draft in drafts.values():
        decode(app, encode(app, "Hello"), True, 8, device, draft)  # warm-up
    for kind, prompts in PROMPTS.items():
        rows = {}
        for name, text in prompts.items():
            ids = encode(app, text)
            runs = compare(app, ids, args, drafts)
            rows[name] = _row(app, ids, runs)
            print(name, {k: v for k, v in rows[name].items() if k != "text"}, flush=True)
        summary: dict[str, Any] = {"all_identical": all(r["identical"] for r in rows.values())}
        tokens = sum(r["decode_tokens"] for r in rows.values())
        for mode in ("plain", *drafts):
            summary[f"{mode}_tok_s"] = tokens / sum(r["decode_tokens"] / r[f"{mode}_tok_s"] for r in rows.values())
        for mode in drafts:
            summary[f"{mode}_speedup"] = summary[f"{mode}_tok_s"] / summary["plain_tok_s"]
        result["kinds"][kind] = summary | {"prompts": rows}
    result["environment"] = environment(device)
    suffix = "cpu" if device.type == "cpu" else torch.cuda.get_device_name().replace(" ", "_")
    save_result(f"speculative_{'draft_' if args.draft else ''}{'graphs_' if args.graphs else ''}{suffix}", result)


if __name__ == "__main__":
    main()
