"""Held-back text for matching strings across streamed pieces."""

from __future__ import annotations

import pytest

from forge.textstream import held_back


# -- held_back ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello", [], 0),
        ("hello", ["xyz"], 0),
        ("hello wo", ["world"], 2),
        ("hello w", ["world"], 1),
        ("hello", ["lo!"], 2),
        ("abc", ["abc"], 0),  # a complete stop is found, not held back
        ("ab", ["abc"], 2),
        ("a", ["abcdef"], 1),
        ("", ["abc"], 0),
        ("xab", ["abz", "bq"], 2),  # the longest prefix over all stops
        ("xab", ["bq", "abz"], 2),
        ("aaa", ["aab"], 2),
    ],
)
def testheld_back(text: str, stops: list[str], expected: int) -> None:
    assert held_back(text, stops) == expected


def testheld_back_is_a_proper_prefix_of_some_stop() -> None:
    text, stops = "the end of the wor", ["world", "the end"]
    k = held_back(text, stops)
    assert k == 3
    assert any(s.startswith(text[len(text) - k :]) and k < len(s) for s in stops)
