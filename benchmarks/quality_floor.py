"""How far the Shakespeare corpus's own statistics carry to the held-out text: smoothed byte n-grams, no training.

``benchmarks/quality_cpu.py`` scores models trained on the 42 Shakespeare texts in bits per byte on the GNU
GPL v3 (issue 22's target: 2.6 in 120 s of CPU). This script measures the same text with interpolated
Kneser-Ney-style byte n-gram models (absolute discounting, orders 2-6) counted on the same corpus, and, for
contrast, on a held-out Shakespeare play that the counts leave out (in-domain). Counting takes no clock budget,
so the best order is a reference for what the corpus alone says about modern legal English: a model trained
for 120 s would have to beat it by a wide margin to reach the target.

    python benchmarks/quality_floor.py
"""

from __future__ import annotations

import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHAKESPEARE, environment, save_result
from quality_cpu import HELD_OUT

ORDERS = range(2, 7)
DISCOUNT = 0.75
IN_DOMAIN = "hamlet"  # left out of the counts for the in-domain row


class NGrams:
    """Byte n-gram counts up to ``order``, interpolated with absolute discounting down to a smoothed unigram."""

    def __init__(self, text: bytes, order: int) -> None:
        self.size = len(text)
        self.counts: list[Counter[bytes]] = [Counter() for _ in range(order + 1)]
        self.totals: list[Counter[bytes]] = [Counter() for _ in range(order + 1)]
        self.kinds: list[defaultdict[bytes, int]] = [defaultdict(int) for _ in range(order + 1)]
        for n in range(1, order + 1):
            counts = self.counts[n]
            for i in range(len(text) - n + 1):
                counts[text[i : i + n]] += 1
            for gram, k in counts.items():
                self.totals[n][gram[:-1]] += k
                self.kinds[n][gram[:-1]] += 1

    def prob(self, context: bytes, byte: int, n: int) -> float:
        if n == 1:
            return (self.counts[1].get(bytes([byte]), 0) + 0.5) / (self.size + 128)
        ctx = context[len(context) - (n - 1) :]
        lower = self.prob(context, byte, n - 1)
        total = self.totals[n].get(ctx, 0)
        if total == 0:
            return lower
        seen = self.counts[n].get(ctx + bytes([byte]), 0)
        return max(seen - DISCOUNT, 0) / total + DISCOUNT * self.kinds[n][ctx] / total * lower

    def bits_per_byte(self, text: bytes, order: int) -> float:
        bits = 0.0
        for i in range(len(text)):
            context = text[max(0, i - order + 1) : i]
            bits -= math.log2(self.prob(context, text[i], min(order, len(context) + 1)))
        return bits / len(text)


def main() -> None:
    files = sorted(SHAKESPEARE.rglob("*.txt"))
    held = HELD_OUT.read_bytes()
    play = [f for f in files if IN_DOMAIN in f.name.lower()]
    if not play:
        raise SystemExit(f"no {IN_DOMAIN} text under {SHAKESPEARE}")
    everything = NGrams(b"\n\n".join(f.read_bytes() for f in files), max(ORDERS))
    without = NGrams(b"\n\n".join(f.read_bytes() for f in files if f not in play), max(ORDERS))
    in_domain = play[0].read_bytes()
    rows = {
        str(n): {
            "held_out_bits_per_byte": round(everything.bits_per_byte(held, n), 4),
            "in_domain_bits_per_byte": round(without.bits_per_byte(in_domain, n), 4),
        }
        for n in ORDERS
    }
    best = min(rows.values(), key=lambda r: r["held_out_bits_per_byte"])
    save_result(
        "quality_floor",
        {
            "benchmark": "quality_floor",
            "data": str(SHAKESPEARE),
            "held_out": str(HELD_OUT),
            "in_domain": play[0].name,
            "method": f"interpolated absolute discounting (D = {DISCOUNT}) over byte n-grams, smoothed unigram base",
            "orders": rows,
            "best_held_out_bits_per_byte": best["held_out_bits_per_byte"],
            "target_bits_per_byte": 2.6,
            "environment": environment(torch.device("cpu")),
        },
    )


if __name__ == "__main__":
    main()
