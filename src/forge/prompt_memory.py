"""Tokenizing a long prompt again only past the prefix it shares with a recent one.

Agents, RAG and chat send the same long system prompt (and tool list, and conversation so far) with every
request. The KV of that prefix is reused by the engine's prefix cache (``forge.core.prefix_cache``); this
module does the same for tokenization, which then dominates the time to the first token of a cached prompt:
HF's byte-level pre-tokenizer alone takes ~1.9 ms for a 2,000-token prompt on a CPU core, where the forward
of the prompt's uncached tail takes about a millisecond on a GPU.

:class:`PromptMemory` keeps the last few long prompts with their token ids. A new prompt that shares a
prefix with one of them keeps that prompt's ids up to a *safe cut* inside the shared text and tokenizes only
the rest. The result is exactly what tokenizing the whole text gives, because of how a byte-level BPE
tokenizer works (GPT-2's, Llama 3's, SmolLM2's and Forge's own):

* the text is split into pre-tokens by a regex, and BPE runs inside each pre-token, so ids never cross a
  pre-token boundary;
* the safe cut is a space with an ASCII letter on each side (``"a b"``). The pre-token that holds the letter
  before it ends there, because no branch of the regex takes a letter and then a space, and `` ?\\p{L}+`` then
  starts a pre-token at the space. The regex looks at most a few characters past a match, so the splits before
  the cut are the same in both texts as long as they agree some characters past it;
* added (special) tokens are cut out of the text before pre-tokenizing, each one id: a cut inside one (an
  added token may hold a space between letters) is inside an id of the remembered prompt, which the lookup
  sees and then tokenizes the whole text. The texts agree for the longest added token past the cut, so one
  that holds the cut in the new prompt holds it in the remembered one too.

Only tokenizers whose JSON shows that pipeline are served from memory (no normalizer, a ``ByteLevel``
pre-tokenizer with its regex, alone or after ``Digits``, no prefix space, a BPE model without byte
fallback); any other tokenizer is simply called. The memory is bounded in prompts and characters and
safe to use from several threads (the server tokenizes in worker threads).
"""

from __future__ import annotations

import array
import bisect
import collections
import itertools
import re
import threading
from typing import Any

__all__ = ["MIN_CHARS", "PromptMemory", "reusable"]

#: Prompts shorter than this are tokenized whole and not remembered (the saving would be microseconds).
MIN_CHARS = 2048
#: How many prompts are remembered, the least recently used dropped first.
MAX_PROMPTS = 16
#: How many characters of prompts are remembered in all; a longer prompt is not kept.
MAX_CHARS = 4_000_000
#: How far back from the end of the shared text a safe cut is looked for.
SEARCH_CHARS = 4096
#: Characters of agreement kept past the cut, beyond the longest added token (the regex's lookahead is 3).
LOOKAHEAD = 4

_CUT = re.compile(r"(?<=[A-Za-z]) (?=[A-Za-z])")


def reusable(tokenizer_json: dict[str, Any]) -> bool:
    """Whether a tokenizer (its ``tokenizer.json``, parsed) splits text as this module relies on."""
    if tokenizer_json.get("normalizer") is not None:
        return False
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        return False
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not steps or steps[-1].get("type") != "ByteLevel":
        return False
    level = steps[-1]
    if not level.get("use_regex", True) or level.get("add_prefix_space", False):
        return False
    return all(step.get("type") == "Digits" for step in steps[:-1])


class PromptMemory:
    """The ids of recent long prompts, so that a prompt sharing a prefix with one is tokenized only past it.

    ``encode(text)`` is an exact, faster ``hf.encode(text, add_special_tokens=False).ids``. ``stats`` counts
    prompts looked up, the ones served partly from memory, and the characters not tokenized again.
    """

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        self._lock = threading.Lock()
        # text -> (its ids, the byte offset after each id), as machine integers (a fifth of a list of ints' memory)
        self._prompts: collections.OrderedDict[str, tuple[array.array, array.array]] = collections.OrderedDict()
        self._chars = 0
        self.stats = {"lookups": 0, "hits": 0, "chars_reused": 0}
        # Bytes of each id's text: a byte-level token's characters are one byte each; added tokens are text.
        vocab = hf.get_vocab(with_added_tokens=True)
        self._lengths = [0] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            self._lengths[i] = len(token)
        added = [t.content for t in hf.get_added_tokens_decoder().values()]
        for content in added:
            self._lengths[vocab[content]] = len(content.encode("utf-8"))
        self._longest_added = max(map(len, added), default=0)

    def encode(self, text: str) -> list[int]:
        if len(text) < MIN_CHARS:
            return self.hf.encode(text, add_special_tokens=False).ids
        found = self._from_memory(text)
        if found is None:
            ids = self.hf.encode(text, add_special_tokens=False).ids
            ends = array.array("q", itertools.accumulate(map(self._lengths.__getitem__, ids)))
        else:
            ids, ends = found
        self._remember(text, ids, ends)
        return ids

    def _from_memory(self, text: str) -> tuple[list[int], array.array] | None:
        """The ids of ``text`` from a remembered prompt's up to a safe cut and a fresh encoding of the rest, and
        the byte offset after each id."""
        with self._lock:
            self.stats["lookups"] += 1
            best, shared = None, 0
            for prompt in reversed(self._prompts):  # the most recent first
                n = _common_prefix(prompt, text)
                if n > shared:
                    best, shared = prompt, n
            if best is None:
                return None
            self._prompts.move_to_end(best)
            ids, ends = self._prompts[best]
        cut = self._cut(best, shared)
        if cut is None:
            return None
        at = len(best[:cut].encode("utf-8"))
        j = bisect.bisect_left(ends, at)  # ends[j]: the byte offset after ids[j]
        if j == len(ends) or ends[j] != at:  # inside an id: an added token holds the cut
            return None
        rest = self.hf.encode(text[cut:], add_special_tokens=False).ids
        with self._lock:
            self.stats["hits"] += 1
            self.stats["chars_reused"] += cut
        rest_ends = itertools.accumulate(map(self._lengths.__getitem__, rest), initial=at)
        next(rest_ends)  # the cut itself
        return ids[: j + 1].tolist() + rest, ends[: j + 1] + array.array("q", rest_ends)

    def _cut(self, prompt: str, shared: int) -> int | None:
        """The last safe cut of ``prompt`` that both texts agree on well past; None if there is none near."""
        end = shared - LOOKAHEAD - self._longest_added  # the cut's right letter sits before this
        if end < 2:
            return None
        found, width = None, 128
        while found is None and width <= SEARCH_CHARS:  # the nearest cut: a small window first
            for match in _CUT.finditer(prompt, max(1, end - width), end):
                found = match.start()
            if end - width <= 1:
                break
            width *= 4
        return found

    def _remember(self, text: str, ids: list[int], ends: array.array) -> None:
        if len(text) > MAX_CHARS // 4:
            return
        if not ends or ends[-1] != len(text.encode("utf-8")):  # the ids do not spell the text byte for byte
            return
        with self._lock:
            if text in self._prompts:
                self._prompts.move_to_end(text)
                return
            self._prompts[text] = (array.array("q", ids), ends)
            self._chars += len(text)
            while len(self._prompts) > MAX_PROMPTS or self._chars > MAX_CHARS:
                old, _ = self._prompts.popitem(last=False)
                self._chars -= len(old)

    def __len__(self) -> int:
        return len(self._prompts)


def _common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of ``a`` and ``b`` (a binary search over slice comparisons)."""
    if a[:64] != b[:64]:
        return _scan(a, b, 0, 64)
    lo, hi = 64, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 64:  # a[:lo] == b[:lo], a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return _scan(a, b, lo, hi)


def _scan(a: str, b: str, start: int, limit: int) -> int:
    """The first index from ``start`` (where they still agree) below ``limit`` at which they differ, else the end."""
    n = min(limit, len(a), len(b))
    for i in range(start, n):
        if a[i] != b[i]:
            return i
    return n
