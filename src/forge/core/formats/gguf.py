"""GGUF, llama.cpp's single-file model format: read it into Forge (writing: :mod:`forge.core.formats.gguf_write`).

A GGUF file holds typed key/value metadata and a list of tensors, each stored as float or as a
quantized block format. Reading keeps each quantized matrix quantized, as the
:class:`~forge.core.quantize.QuantizedWeight` that holds its blocks' values exactly
(:func:`forge.core.quantize.from_gguf`; float tensors are read as float32), or with ``quantized=False``
dequantizes every tensor to float32 with ``gguf.quants``; writing quantizes with it. The ``gguf`` package is
an optional dependency (``pip install gguf``).

>>> p = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
>>> p.config.n_layer  # doctest: +SKIP
30

Metadata (``{arch}`` is ``general.architecture``: "llama", "qwen2" or "gpt2")::

    {arch}.block_count, context_length, embedding_length   ModelConfig.n_layer, context_length, d_model
    {arch}.feed_forward_length                             d_ff
    {arch}.attention.head_count, head_count_kv             n_head, n_kv_head
    {arch}.rope.freq_base                                  rope_theta
    {arch}.attention.layer_norm_rms_epsilon (gpt2: _eps)   norm_eps
    {arch}.rope.scaling.type/factor, rope_freqs.weight     rope_scaling: "linear", or "llama3" (Llama 3.1+)
    tokenizer.ggml.*                                       a tokenizers.Tokenizer and SpecialTokens
    tokenizer.chat_template                                chat_template

Tensors (llama.cpp lists dimensions innermost first: ``[576, 49152]`` is a (49152, 576) matrix)::

    GGUF                                         Forge
    token_embd, position_embd (gpt2)             tok_emb, pos_emb
    output_norm (.weight/.bias)                  norm
    output (absent, or equal to token_embd)      lm_head (tied to tok_emb)
    blk.{i}.attn_norm, blk.{i}.ffn_norm          blocks.{i}.norm1, norm2
    blk.{i}.attn_q, attn_k, attn_v               blocks.{i}.attn.qkv   rows [q; k; v]  (gpt2: attn_qkv, fused)
    blk.{i}.attn_output                          blocks.{i}.attn.proj
    blk.{i}.ffn_gate, ffn_up                     blocks.{i}.mlp.up     rows [gate; up] (gpt2: ffn_up only)
    blk.{i}.ffn_down                             blocks.{i}.mlp.down

llama.cpp's "llama" graph rotates adjacent pairs (x0, x1) where HF and Forge rotate halves
(x0, x_{D/2}), so its converter permutes the rows of attn_q and attn_k within each head: reading
undoes that, writing redoes it. "qwen2" rotates halves like Forge and is stored unpermuted. A quantized
matrix is permuted and concatenated (q|k|v, gate|up) as whole rows of its blocks, before it becomes a
quantized weight; parts of different types are dequantized and joined as float32.

Tokenizers and special tokens (``tokenizer.ggml.*``) are read and written by :mod:`forge.core.formats.gguf_tokenizer`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from forge.config import ModelConfig
from forge.core.attention import rope_tables
from forge.core.formats import Pretrained
from forge.core.formats.gguf_tokenizer import read_tokenizer
from forge.core.quantize import GGUF_KEPT, QuantizedWeight, from_gguf
from forge.core.transformer import Transformer
from forge.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TYPES",
    "read_gguf",
    "read_gguf_tensors",
]

#: ``general.architecture`` values Forge reads. Mistral and SmolLM files say "llama".
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "gpt2")
#: Tensor types Forge dequantizes (with gguf.quants), each covered by the tests.
SUPPORTED_TYPES: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip


def _gguf() -> ModuleType:
    try:
        import gguf
    except ImportError:
        raise CheckpointError(
            "GGUF files need the `gguf` package, which is not installed; run `pip install gguf`"
        ) from None
    return gguf


# -- reading ------------------------------------------------------------------------------------------------------


def read_gguf(path: str | os.PathLike[str], *, quantized: bool = True) -> Pretrained:
    """Read a GGUF model: config, state dict in Forge's names, tokenizer, special tokens, chat template.

    The state dict holds each quantized matrix as a :class:`~forge.core.quantize.QuantizedWeight` with exactly
    the file's values (a tied embedding and head are one module), and the float tensors as float32; with
    ``quantized=False`` every tensor is dequantized to float32.

    >>> p = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> p.config.n_layer, p.meta["quant_types"], type(p.state_dict["blocks.0.mlp.up.weight"]).__name__  # doctest: +SKIP
    (30, ['F32', 'Q4_1', 'Q8_0'], 'Int4Weight')
    """
    p, reader = _open(path)
    meta = _Metadata(reader, p)
    arch = str(meta.require("general.architecture"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"GGUF file {str(p)!r} holds a {arch!r} model, which Forge cannot run; supported architectures are "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Mistral and SmolLM files are 'llama'): use a model of one of those"
        )
    _check_types(reader.tensors, p)
    by_name = {t.name: t for t in reader.tensors}
    tied = _is_tied(by_name)
    tensors = {name: _read_tensor(t, p, quantized) for name, t in by_name.items()}
    config = _read_config(meta, arch, tensors, tied, p)
    tokenizer, special = read_tokenizer(meta, p, n_vocab=config.vocab_size)
    file_type = meta.get("general.file_type")
    known_types = {t.value: t.name for t in _gguf().LlamaFileType}
    return Pretrained(
        config=config,
        state_dict=_to_forge(tensors, config, arch, p),
        tokenizer=tokenizer,
        special=special,
        chat_template=meta.get("tokenizer.chat_template"),
        meta={
            "format": "gguf",
            "architecture": arch,
            "name": meta.get("general.name"),
            "file_type": known_types.get(file_type, file_type),
            "quant_types": sorted({t.tensor_type.name for t in reader.tensors}),
        },
    )


def read_gguf_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file by its GGUF name, dequantized to float32, in PyTorch's (rows, columns) order.

    Tensors are returned as stored: llama's attn_q/attn_k rows are still in llama.cpp's permuted order.

    >>> read_gguf_tensors("model.gguf")["token_embd.weight"].shape  # doctest: +SKIP
    torch.Size([49152, 576])
    """
    p, reader = _open(path)
    _check_types(reader.tensors, p)
    return {t.name: _dequantize(t, p) for t in reader.tensors}


def _open(path: str | os.PathLike[str]) -> tuple[Path, GGUFReader]:
    gguf = _gguf()
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise CheckpointError(f"GGUF file {str(p)!r} {what}; pass the path of a .gguf model file")
    with p.open("rb") as f:
        head = f.read(8)
    if not head:
        raise CheckpointError(f"GGUF file {str(p)!r} is empty; re-download or re-convert it")
    if not b"GGUF".startswith(head[:4]):
        raise CheckpointError(
            f"{str(p)!r} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF'); pass a .gguf model file, "
            "e.g. one made by llama.cpp's convert_hf_to_gguf.py"
        )
    if len(head) == 8:
        version = min(int.from_bytes(head[4:], "little"), int.from_bytes(head[4:], "big"))  # either byte order
        if version not in (2, 3):
            raise CheckpointError(
                f"GGUF file {str(p)!r} is format version {version}, and Forge reads versions 2 and 3; "
                "re-convert it with a current llama.cpp"
            )
    try:
        return p, gguf.GGUFReader(p)
    except Exception as e:  # numpy raises anything from deep inside on a cut-off or damaged file
        if "GGMLQuantizationType" in str(e):
            raise CheckpointError(
                f"GGUF file {str(p)!r} has a tensor type the installed gguf package does not know ({e}); "
                f"Forge reads {', '.join(SUPPORTED_TYPES)}: use a file quantized to one of those"
            ) from None
        detail = f"{type(e).__name__}: {e}"[:160]
        raise CheckpointError(
            f"GGUF file {str(p)!r} is truncated or corrupt ({detail}); re-download or re-convert it"
        ) from None


class _Metadata:
    """The key/value metadata of an open GGUF file, as Python values."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self._fields, self._path = reader.fields, path

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, UnicodeDecodeError, IndexError) as e:
            raise CheckpointError(
                f"GGUF file {str(self._path)!r} has an unreadable value for {key!r} ({e}); re-download or re-convert it"
            ) from None

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(
                f"GGUF file {str(self._path)!r} lacks the metadata key {key!r}, so it is incomplete or not a model; "
                "re-convert it with llama.cpp's convert_hf_to_gguf.py"
            )
        return value


def _check_types(tensors: Sequence[ReaderTensor], path: Path) -> None:
    for t in tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"GGUF file {str(path)!r} stores tensor {t.name!r} as {t.tensor_type.name}, which Forge cannot "
                f"dequantize; supported types are {', '.join(SUPPORTED_TYPES)}: use a file quantized to one of "
                "those (e.g. Q4_K_M, Q8_0 or F16)"
            )


def _dequantize(tensor: ReaderTensor, path: Path) -> torch.Tensor:
    gguf = _gguf()
    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except (ValueError, IndexError, TypeError) as e:
        raise CheckpointError(
            f"GGUF file {str(path)!r} has a damaged tensor {tensor.name!r} ({e}); re-download or re-convert it"
        ) from None
    data = np.asarray(data, dtype=np.float32)
    if not data.flags.writeable:  # a float32 tensor is a view of the read-only memory map
        data = data.copy()
    return torch.from_numpy(data).reshape(tuple(reversed(tensor.shape.tolist())))


@dataclass
class _Blocks:
    """A quantized matrix still in the file's blocks: one row of raw bytes per output row. llama.cpp's q/k row
    permutation and the q|k|v and gate|up concatenations move whole rows, so they are exact here."""

    qtype: int
    rows: torch.Tensor  # (out, bytes a row) uint8
    width: int  # values a row

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows.shape[0], self.width))

    def dequantize(self) -> torch.Tensor:
        data = _gguf().quants.dequantize(self.rows.numpy(), self.qtype)
        return torch.from_numpy(np.asarray(data, dtype=np.float32)).reshape(self.shape)


_Tensor = torch.Tensor | _Blocks


def _read_tensor(tensor: ReaderTensor, path: Path, quantized: bool) -> _Tensor:
    if quantized and tensor.tensor_type.name in GGUF_KEPT and len(tensor.shape) == 2:
        out, width = int(tensor.shape[1]), int(tensor.shape[0])
        rows = np.array(tensor.data, dtype=np.uint8)  # a copy: the reader's array is the read-only memory map
        if rows.size % max(out, 1):
            raise CheckpointError(f"GGUF file {str(path)!r} has a damaged tensor {tensor.name!r}; re-download it")
        return _Blocks(int(tensor.tensor_type), torch.from_numpy(rows.reshape(out, -1)), width)
    return _dequantize(tensor, path)


def _rowwise(part: _Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> _Tensor:
    """``fn`` (a reordering of rows) applied to a float tensor or to the rows of a matrix's blocks."""
    return _Blocks(part.qtype, fn(part.rows), part.width) if isinstance(part, _Blocks) else fn(part)


def _join(parts: list[_Tensor]) -> _Tensor:
    """The rows of ``parts`` one after another: still blocks if all are blocks of one type, else float32."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if all(isinstance(b, _Blocks) and b.qtype == first.qtype and b.width == first.width for b in parts):
        return _Blocks(first.qtype, torch.cat([b.rows for b in parts]), first.width)  # type: ignore[union-attr]
    return torch.cat([b.dequantize() if isinstance(b, _Blocks) else b for b in parts])


def _built(value: _Tensor, what: str, path: Path) -> torch.Tensor | QuantizedWeight:
    if not isinstance(value, _Blocks):
        return value
    try:
        return from_gguf(value.qtype, value.rows, value.shape)
    except ConfigError as e:
        raise CheckpointError(
            f"GGUF file {str(path)!r}: {what} cannot be read ({e}); re-download or re-convert it"
        ) from None


def _is_tied(tensors: dict[str, ReaderTensor]) -> bool:
    out, emb = tensors.get("output.weight"), tensors.get("token_embd.weight")
    if out is None or emb is None:
        return out is None
    # GPT-2 converters write the tied matrix twice; identical bytes mean one matrix.
    return (
        out.tensor_type == emb.tensor_type and out.data.shape == emb.data.shape and np.array_equal(out.data, emb.data)
    )


def _f32(value: Any) -> float:
    """A float32 from the file as the decimal it was written from: 9.99999975e-06 -> 1e-05."""
    return float(str(np.float32(value)))


def _read_config(meta: _Metadata, arch: str, tensors: dict[str, _Tensor], tied: bool, path: Path) -> ModelConfig:
    def count(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            meta.require(f"{arch}.{key}")
        if not isinstance(value, int) or isinstance(value, bool):
            raise CheckpointError(
                f"GGUF file {str(path)!r} has {arch}.{key} = {str(value)[:60]} (per-layer values), which Forge's "
                "uniform layers cannot represent; use a model whose layers all have the same shape"
            )
        return value

    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"GGUF file {str(path)!r} has no token_embd.weight tensor; re-convert it")
    d_model, n_head = count("embedding_length"), count("attention.head_count")
    _check_sizes(tensors, {"embedding_length": d_model, "block_count": count("block_count")}, arch, path)
    head_dim = d_model // max(n_head, 1)
    unsupported = {"attention.key_length": head_dim, "attention.value_length": head_dim}
    if arch != "gpt2":
        unsupported["rope.dimension_count"] = head_dim  # partial rotary
    for key, want in unsupported.items():
        if meta.get(f"{arch}.{key}", want) != want:
            raise CheckpointError(
                f"GGUF file {str(path)!r} has {arch}.{key} = {meta.get(f'{arch}.{key}')} where Forge needs "
                f"d_model / n_head = {head_dim}; use a model without a separate head size"
            )
    n_kv = count("attention.head_count_kv", n_head)
    fields: dict[str, Any] = {
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "context_length": count("context_length"),
        "n_layer": count("block_count"),
        "n_head": n_head,
        "n_kv_head": None if n_kv == n_head else n_kv,
        "d_model": d_model,
        "tie_embeddings": tied,
    }
    if arch == "gpt2":
        eps = _f32(meta.require("gpt2.attention.layer_norm_epsilon"))
        fields |= {"norm": "layernorm", "activation": "gelu", "position": "learned", "bias": True, "norm_eps": eps}
    else:
        theta = _f32(meta.get(f"{arch}.rope.freq_base", 10000.0))
        bias, qkv_bias = "blk.0.attn_output.bias" in tensors, "blk.0.attn_q.bias" in tensors
        fields |= {
            "norm": "rmsnorm",
            "activation": "swiglu",
            "position": "rope",
            "bias": bias,
            "qkv_bias": None if qkv_bias == bias else qkv_bias,
            "rope_theta": theta,
            "norm_eps": _f32(meta.require(f"{arch}.attention.layer_norm_rms_epsilon")),
            "rope_scaling": _read_rope_scaling(meta, arch, tensors, head_dim, theta, path),
        }
    try:
        return ModelConfig(**fields, d_ff=count("feed_forward_length"))
    except ConfigError as e:
        raise CheckpointError(
            f"GGUF file {str(path)!r} describes a model Forge cannot build ({e}); its metadata is inconsistent, "
            "re-convert it"
        ) from None


def _check_sizes(tensors: dict[str, _Tensor], sizes: dict[str, int], arch: str, path: Path) -> None:
    """The metadata's width and depth against the tensors the file really holds, before either sizes anything:
    a damaged or hostile file can claim any number, and Forge would build (and loop over) that many layers."""
    emb = tuple(tensors["token_embd.weight"].shape)
    layers = {name.split(".")[1] for name in tensors if name.startswith("blk.")}
    found = {"embedding_length": emb[1] if len(emb) == 2 else None, "block_count": len(layers)}
    for key, value in sizes.items():
        if value != found[key]:
            held = f"token_embd.weight is {emb}" if key == "embedding_length" else f"it holds {len(layers)} layers"
            raise CheckpointError(
                f"GGUF file {str(path)!r} has {arch}.{key} = {value}, but {held}; the file is inconsistent, "
                "re-convert it"
            )


def _read_rope_scaling(
    meta: _Metadata, arch: str, tensors: dict[str, _Tensor], head_dim: int, theta: float, path: Path
) -> dict[str, Any] | None:
    freqs = tensors.pop("rope_freqs.weight", None)  # 1-D: always float
    assert not isinstance(freqs, _Blocks)
    if freqs is not None:
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        return _llama3_scaling(freqs, head_dim, theta, original, path)
    kind, factor = meta.get(f"{arch}.rope.scaling.type"), meta.get(f"{arch}.rope.scaling.factor")
    if kind is None and meta.get(f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", meta.get(f"{arch}.rope.scale_linear")  # files older than rope.scaling.type
    if kind in (None, "none") or (kind == "linear" and float(factor or 1.0) == 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    raise CheckpointError(
        f"GGUF file {str(path)!r} uses {kind!r} RoPE scaling, which Forge does not implement (it supports linear "
        "scaling and Llama 3's rope_freqs); use a model without it"
    )


def _inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Forge's RoPE frequencies (head_dim/2,), read back from its tables: the angle at position 1."""
    cos, sin = rope_tables(head_dim, 2, theta, scaling)
    return torch.atan2(sin[1, : head_dim // 2].double(), cos[1, : head_dim // 2].double())


def _llama3_scaling(
    freqs: torch.Tensor, head_dim: int, theta: float, original: int | None, path: Path
) -> dict[str, Any]:
    """Llama 3's RoPE scaling parameters from llama.cpp's rope_freqs (one divisor per frequency).

    The divisors are 1 above the wavelength old/high, ``factor`` below old/low, and in between
    1/divisor is linear in 1/wavelength, so the two edges follow from the divisors in that band.
    ``old`` comes from the file, else Llama 3's 8192; Llama 3's low=1, high=4 are tried first.
    """
    old = int(original or 8192)
    factor = float(freqs.max()) if freqs.numel() else 1.0
    candidates = [(1.0, 4.0)]
    if freqs.shape == (head_dim // 2,) and factor > 1:
        f, x = freqs.double(), _inverse_frequencies(head_dim, theta, None) / (2 * math.pi)  # x = 1 / wavelength
        band = (f > 1.0001) & (f < factor / 1.0001)
        if int(band.sum()) >= 2:
            smooth = (1 / f[band] - 1 / factor) / (1 - 1 / factor)  # (old * x - low) / (high - low)
            slope, intercept = np.polyfit(x[band].numpy(), smooth.numpy(), 1)
            low = -intercept / slope * old
            candidates.append((round(low, 4), round(low + old / slope, 4)))
    for low, high in candidates:
        scaling = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": old,
        }
        if freqs.shape == (head_dim // 2,):
            divisors = _inverse_frequencies(head_dim, theta, None) / _inverse_frequencies(head_dim, theta, scaling)
            if torch.allclose(divisors, freqs.double(), rtol=1e-3):
                return scaling
    raise CheckpointError(
        f"GGUF file {str(path)!r} has a rope_freqs.weight tensor that is not Llama 3's RoPE scaling, the only "
        "per-frequency scaling Forge implements; use a model without it"
    )


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved RoPE rows (per head: x0, x_{D/2}, x1, ...) back to rotate-half order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rotate-half rows to llama.cpp's interleaved order (its converter's ``permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: allocates nothing
        return {name: t.shape for name, t in Transformer(config).state_dict().items()}


def _to_forge(
    tensors: dict[str, _Tensor], cfg: ModelConfig, arch: str, path: Path
) -> dict[str, torch.Tensor | QuantizedWeight]:
    sd: dict[str, torch.Tensor | QuantizedWeight] = {}
    origin: dict[str, str] = {}
    missing: list[str] = []

    def put(dst: str, *names: str, permute: bool = False) -> None:
        if any(n not in tensors for n in names):
            missing.extend(n for n in names if n not in tensors)
            return
        parts = [tensors.pop(n) for n in names]
        origin[dst] = " + ".join(names)
        try:
            if permute:  # q and k of llama.cpp's "llama" graph
                parts[0] = _rowwise(parts[0], lambda w: _unpermute(w, cfg.n_head))
                parts[1] = _rowwise(parts[1], lambda w: _unpermute(w, cfg.kv_heads))
            joined = _join(parts)
        except RuntimeError:  # rows not a multiple of the heads, or widths that differ
            shapes = [tuple(t.shape) for t in parts]
            raise CheckpointError(
                f"GGUF file {str(path)!r}: {origin[dst]} have shapes {shapes}, which do not fit the metadata's "
                f"{cfg.n_head} heads and width {cfg.d_model}; the file is inconsistent, re-convert it"
            ) from None
        sd[dst] = _built(joined, origin[dst], path)

    put("tok_emb.weight", "token_embd.weight")
    if cfg.position == "learned":
        put("pos_emb.weight", "position_embd.weight")
    _put_norm(put, "norm", "output_norm", cfg)
    if cfg.tie_embeddings:
        tensors.pop("output.weight", None)
        if "tok_emb.weight" in sd:
            sd["lm_head.weight"] = sd["tok_emb.weight"]
    else:
        put("lm_head.weight", "output.weight")
    permute = arch == "llama"
    for i in range(cfg.n_layer):
        b, f = f"blk.{i}.", f"blocks.{i}."
        _put_norm(put, f + "norm1", b + "attn_norm", cfg)
        _put_norm(put, f + "norm2", b + "ffn_norm", cfg)
        if arch == "gpt2":
            put(f + "attn.qkv.weight", b + "attn_qkv.weight")
            put(f + "mlp.up.weight", b + "ffn_up.weight")
        else:
            put(f + "attn.qkv.weight", *(b + f"attn_{x}.weight" for x in "qkv"), permute=permute)
            put(f + "mlp.up.weight", b + "ffn_gate.weight", b + "ffn_up.weight")
        put(f + "attn.proj.weight", b + "attn_output.weight")
        put(f + "mlp.down.weight", b + "ffn_down.weight")
        if cfg.attn_bias:
            qkv_bias = [b + "attn_qkv.bias"] if arch == "gpt2" else [b + f"attn_{x}.bias" for x in "qkv"]
            put(f + "attn.qkv.bias", *qkv_bias, permute=permute)
        if cfg.bias:
            put(f + "attn.proj.bias", b + "attn_output.bias")
            put(
                f + "mlp.up.bias",
                *([b + "ffn_up.bias"] if arch == "gpt2" else [b + "ffn_gate.bias", b + "ffn_up.bias"]),
            )
            put(f + "mlp.down.bias", b + "ffn_down.bias")
    _check_mapping(cfg, arch, sd, origin, missing, sorted(tensors), path)
    return sd


def _check_mapping(
    cfg: ModelConfig,
    arch: str,
    sd: dict[str, torch.Tensor | QuantizedWeight],
    origin: dict[str, str],
    missing: list[str],
    unused: list[str],
    path: Path,
) -> None:
    where = f"GGUF file {str(path)!r}"
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{where} lacks tensors {missing[:5]}{more} that its {arch!r} metadata calls for; the file is incomplete "
            "or was converted wrongly: re-download or re-convert it"
        )
    if unused:
        raise CheckpointError(
            f"{where} has tensors Forge's {arch!r} model has no place for: {unused[:5]}; it is a variant "
            "Forge does not support: use a plain Llama, Qwen2 or GPT-2 model"
        )
    for name, shape in _expected_shapes(cfg).items():
        if name in sd and sd[name].shape != shape:
            raise CheckpointError(
                f"{where}: {origin.get(name, name)} gives {name} the shape {tuple(sd[name].shape)}, but the metadata "
                f"implies {tuple(shape)}; the file is inconsistent, re-convert it"
            )


def _put_norm(put: Callable[..., None], dst: str, src: str, cfg: ModelConfig) -> None:
    put(f"{dst}.weight", f"{src}.weight")
    if cfg.norm == "layernorm" and cfg.bias:
        put(f"{dst}.bias", f"{src}.bias")
