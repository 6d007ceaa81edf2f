"""Quantization quality: bits per byte of SmolLM2-135M (its shipped Q4_1 GGUF) on a held-out English text.

Prints JSON and writes benchmarks/results/quant_quality.json. ``forge eval``'s computation (sliding windows,
every token scored once) on the first ``--max-tokens`` tokens of a text none of this was tuned on (the GPL-3
licence text that Debian ships, by default), for:

- ``float32``: the file dequantized to float32 (the reference: the file's own 4-bit weights, exactly);
- ``kept``: the file kept quantized (Q4_1 -> int4, Q8_0 -> int8), Forge's default for it;
- ``bf16``: the file dequantized to bfloat16;
- ``int8-rtn``: the float32 model requantized to int8 per channel (round-to-nearest);
- ``int4-rtn``: the float32 model requantized to int4 in groups of 32 (round-to-nearest).

The original bf16 SmolLM2 is not on this machine, so every variant starts from the file's 4-bit weights;
ratios are against ``float32``.

    python benchmarks/quant_quality.py [--text PATH] [--max-tokens 4000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, save_result
from forge import Forge
from forge.models import locate

VARIANTS = {
    "float32": {"dtype": "float32"},
    "kept": {},
    "bf16": {"dtype": "bfloat16"},
    "int8-rtn": {"dtype": "float32", "quantize": "int8"},
    "int4-rtn": {"dtype": "float32", "quantize": "int4"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    p.add_argument("--max-tokens", type=int, default=4000)
    args = p.parse_args()
    torch.set_num_threads(2)
    path = locate(args.model)
    runs: dict[str, dict[str, object]] = {}
    for name, options in VARIANTS.items():
        app = Forge.load(path, device="cpu", **options)
        t = time.perf_counter()
        result = app.sync.run_coroutine(app.evaluate(args.text, max_tokens=args.max_tokens))
        info = app.info()
        runs[name] = {
            "bits_per_byte": result["bits_per_byte"],
            "perplexity": result["perplexity"],
            "tokens": result["tokens"],
            "seconds": time.perf_counter() - t,
            "weight_bytes": info["weight_bytes"],
            "dtype": info["dtype"],
        }
    ref = runs["float32"]["bits_per_byte"]
    for r in runs.values():
        r["bpb_vs_float32"] = r["bits_per_byte"] / ref  # type: ignore[operator]
    out = {"benchmark": "quant_quality", "model": path.name, "text": str(args.text), "runs": runs}
    out["env"] = environment(torch.device("cpu"))
    save_result("quant_quality", out)


if __name__ == "__main__":
    main()
