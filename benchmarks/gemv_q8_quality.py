"""What the GPU decode path's rounding of x costs: SmolLM2-135M (its shipped Q4_1 GGUF, kept quantized) scored
with every quantized linear's input rounded to int8 per group of 32, as ``gemv_q8`` does on CUDA, against the exact
input, in the same run on the CPU.

``gemv_q8`` (forge.kernels.quant_gemv) is the CUDA path of a decode step's quantized matmuls (up to 4 rows of x):
x rounded per 32 values (scale absmax / 127) so that four products take one ``dp4a``, as llama.cpp's CUDA MMVQ
does. Rounding is per row, so rounding every row of a whole-text forward scores each position as decoding it
would. Reported for a held-out English text (the GPL-3 licence text Debian ships), not tuned on:

for x rounded to int16 (``gemv_q16``, two products a ``dp2a``) and to int8 (``gemv_q8``, four a ``dp4a``):

- ``bits_per_byte`` (``forge eval``'s sliding windows) and its ratio to the exact input's;
- ``top1_agreement_512``: over the text's first 512 positions, the share whose most likely next token is the same;
  ``bf16_top1_agreement_512`` gives the scale of such noise: the same file dequantized to bfloat16 against it;
- ``chat``: the reply to "What is the capital of France?" and ``greedy``: 32-token greedy continuations of a few
  prompts, rounding where the GPU would (x of up to 4 rows: the decode steps), against the exact ones.

    python benchmarks/gemv_q8_quality.py [--text PATH] [--max-tokens 4000]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, save_result
from forge import Forge
from forge.core.quantize import Int4Weight, Int8GroupWeight, Int8Weight
from forge.kernels.reference import round_x
from forge.models import locate

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,")


@contextmanager
def rounded(most_rows: int | None, bits: int = 8) -> Iterator[None]:
    """Every quantized linear (of the schemes gemv_q8 takes) multiplies by x rounded to ``bits`` per 32, where x
    has at most ``most_rows`` rows (None: always)."""
    saved = {cls: cls.linear for cls in (Int4Weight, Int8Weight, Int8GroupWeight)}

    def wrap(linear):  # type: ignore[no-untyped-def]
        def run(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
            rows = x.numel() // x.shape[-1]
            if most_rows is None or rows <= most_rows:
                x = round_x(x, bits).to(x.dtype)
            return linear(self, x, bias)

        return run

    for cls, linear in saved.items():
        cls.linear = wrap(linear)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for cls, linear in saved.items():
            cls.linear = linear  # type: ignore[method-assign]


def top1(app: Forge, ids: list[int]) -> torch.Tensor:
    model = app.model
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0].argmax(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    p.add_argument("--max-tokens", type=int, default=4000)
    args = p.parse_args()
    torch.set_num_threads(2)
    app = Forge.load(locate(args.model), device="cpu")
    ids = app.tokenizer.encode(args.text.read_text())[:512]
    exact = top1(app, ids)
    exact_bpb = app.sync.run_coroutine(app.evaluate(args.text, max_tokens=args.max_tokens))
    bf16 = Forge.load(locate(args.model), device="cpu", dtype="bfloat16")
    out: dict[str, object] = {
        "benchmark": "gemv_q8_quality",
        "model": args.model,
        "text": str(args.text),
        "tokens": exact_bpb["tokens"],
        "bits_per_byte_exact": exact_bpb["bits_per_byte"],
        "bf16_top1_agreement_512": (top1(bf16, ids) == exact).float().mean().item(),
    }
    del bf16
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    out["chat_exact"] = app.sync.chat(chat, max_tokens=24, temperature=0)
    for bits in (16, 8):
        with rounded(None, bits):
            bpb = app.sync.run_coroutine(app.evaluate(args.text, max_tokens=args.max_tokens))["bits_per_byte"]
            agree = (top1(app, ids) == exact).float().mean().item()
        row: dict[str, object] = {
            "bits_per_byte": bpb,
            "bpb_ratio": bpb / exact_bpb["bits_per_byte"],
            "top1_agreement_512": agree,
        }
        with rounded(4, bits):  # where the GPU rounds: the decode steps
            row["chat"] = app.sync.chat(chat, max_tokens=24, temperature=0)
        greedy = []
        for prompt in PROMPTS:
            want = app.sync.generate(prompt, max_tokens=32, temperature=0)
            with rounded(4, bits):
                got = app.sync.generate(prompt, max_tokens=32, temperature=0)
            greedy.append({"prompt": prompt, "exact": want, "rounded": got, "equal": want == got})
        row["greedy"] = greedy
        out[f"int{bits}"] = row
    out["env"] = environment(torch.device("cpu"))
    save_result("gemv_q8_quality", out)


if __name__ == "__main__":
    main()
