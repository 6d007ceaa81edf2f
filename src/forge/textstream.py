"""Matching strings in text that arrives piece by piece.

Used by the generator's stop sequences and by middleware that filters
streamed output: text that could be the start of a watched string is held
back until the next piece shows whether it is.

>>> held_back("Hello wor", ["world"])
3
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["held_back"]


def held_back(text: str, needles: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``needles``."""
    best = 0
    for s in needles:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
