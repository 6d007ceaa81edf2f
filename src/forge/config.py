"""Model configuration and the preset registry.

``ModelConfig`` describes a decoder-only transformer of either family:

* GPT-2 style: LayerNorm, GELU MLP, learned absolute positions, biases.
* Llama style: RMSNorm, SwiGLU MLP, rotary positions (RoPE), grouped-query attention.

Presets are matched by exact name; a miss suggests close names.

>>> cfg = get_preset("tiny")
>>> cfg.family, cfg.n_layer
('gpt2', 4)
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Literal

from forge.errors import ConfigError, PresetNotFoundError

__all__ = ["MAX_SIZES", "PRESETS", "ModelConfig", "get_preset", "preset_names", "register_preset"]

Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "swiglu"]
Position = Literal["learned", "rope"]


#: Upper bounds on a config's sizes, far past any released model (Llama 3.1 405B: 126 layers, width 16384, FFN 53248,
#: a 256k vocabulary, 128k positions): a model file that declares more is damaged or hostile, and would make Forge
#: allocate terabytes.
MAX_SIZES: dict[str, int] = {
    "vocab_size": 1 << 22,
    "context_length": 1 << 24,
    "n_layer": 1024,
    "n_head": 4096,
    "d_model": 1 << 17,
    "d_ff": 1 << 20,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    >>> ModelConfig(vocab_size=256, context_length=64, n_layer=2, n_head=2, d_model=32).head_dim
    16
    """

    vocab_size: int
    context_length: int
    n_layer: int
    n_head: int
    d_model: int
    n_kv_head: int | None = None  # None: same as n_head (no grouped-query attention)
    d_ff: int | None = None  # None: 4*d_model for GELU, ~8/3*d_model (rounded) for SwiGLU
    norm: Norm = "layernorm"
    activation: Activation = "gelu"
    position: Position = "learned"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    bias: bool = True
    qkv_bias: bool | None = None  # None: same as bias (Qwen2 has biases on q, k, v only)
    tie_embeddings: bool = True
    dropout: float = 0.0
    #: RoPE frequency scaling, as in HF configs: {"rope_type": "linear", "factor": 4.0} or
    #: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError.for_field("ModelConfig", name, value, "must be a positive integer")
        for name, most in MAX_SIZES.items():
            value = getattr(self, name)
            if isinstance(value, int) and value > most:
                raise ConfigError.for_field("ModelConfig", name, value, f"must be at most {most}")
        if self.d_model % self.n_head:
            raise ConfigError.for_field(
                "ModelConfig", "d_model", self.d_model, f"must be divisible by n_head={self.n_head}"
            )
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ConfigError.for_field(
                "ModelConfig", "n_kv_head", self.n_kv_head, f"must be >= 1 and divide n_head={self.n_head}"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError.for_field(
                "ModelConfig", "d_model", self.d_model, "RoPE needs an even head dimension (d_model / n_head)"
            )
        for name, allowed in (
            ("norm", ("layernorm", "rmsnorm")),
            ("activation", ("gelu", "swiglu")),
            ("position", ("learned", "rope")),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError.for_field("ModelConfig", name, getattr(self, name), f"use one of {allowed}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError.for_field("ModelConfig", "dropout", self.dropout, "must be in [0, 1)")
        if not self.rope_theta > 0:
            raise ConfigError.for_field("ModelConfig", "rope_theta", self.rope_theta, "must be > 0")
        if not self.norm_eps > 0:
            raise ConfigError.for_field("ModelConfig", "norm_eps", self.norm_eps, "must be > 0, e.g. 1e-5")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("linear", "llama3", "default"):
                raise ConfigError.for_field(
                    "ModelConfig", "rope_scaling", self.rope_scaling, "supported rope_type: linear, llama3, default"
                )
        if self.d_ff is not None and self.d_ff < 1:
            raise ConfigError.for_field("ModelConfig", "d_ff", self.d_ff, "must be a positive integer")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def attn_bias(self) -> bool:
        """Whether the q, k, v projections have biases."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.activation == "gelu":
            return 4 * self.d_model
        # SwiGLU has three matrices; 2/3 of 4*d keeps the parameter count of a GELU MLP.
        return 64 * ((int(8 * self.d_model / 3) + 63) // 64)

    @property
    def family(self) -> str:
        return "llama" if self.position == "rope" else "gpt2"

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model config has unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)


def _gpt2(vocab: int, ctx: int, layers: int, heads: int, d: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, context_length=ctx, n_layer=layers, n_head=heads, d_model=d)


def _llama(vocab: int, ctx: int, layers: int, heads: int, kv: int, d: int, ff: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        context_length=ctx,
        n_layer=layers,
        n_head=heads,
        n_kv_head=kv,
        d_model=d,
        d_ff=ff,
        norm="rmsnorm",
        activation="swiglu",
        position="rope",
        bias=False,
        norm_eps=1e-5,
    )


#: Presets by exact name. ``vocab_size`` is the size a tokenizer trained for the
#: preset aims at; training sets it to the trained tokenizer's real size.
PRESETS: dict[str, ModelConfig] = {
    # GPT-2 family
    "tiny": _gpt2(2048, 256, 4, 4, 128),  # ~1.05M params
    "small": _gpt2(8192, 512, 10, 8, 256),  # ~10M
    "gpt2": _gpt2(50257, 1024, 12, 12, 768),  # 124M
    "gpt2-medium": _gpt2(50257, 1024, 24, 16, 1024),  # 355M
    # Llama family
    "llama-tiny": _llama(2048, 256, 4, 4, 2, 128, 352),  # ~1.0M
    "llama-small": _llama(8192, 512, 10, 8, 4, 256, 704),  # ~10M
    "smollm2-135m": _llama(49152, 2048, 30, 9, 3, 576, 1536),  # 135M, SmolLM2's shape
    "smollm2-360m": _llama(49152, 2048, 32, 15, 5, 960, 2560),  # 362M, SmolLM2's shape
}


def register_preset(name: str, config: ModelConfig, *, overwrite: bool = False) -> None:
    """Add a preset under ``name``; replacing an existing one needs ``overwrite=True``.

    >>> register_preset("my-tiny", get_preset("tiny").replace(n_layer=2))
    >>> get_preset("my-tiny").n_layer
    2
    """
    if not isinstance(config, ModelConfig):
        raise ConfigError(f"register_preset({name!r}, ...) needs a ModelConfig, got {type(config).__name__}")
    if name in PRESETS and not overwrite:
        raise ConfigError(f"preset {name!r} already exists; pass overwrite=True to replace it")
    PRESETS[name] = config


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> ModelConfig:
    """The preset called exactly ``name``; a miss suggests close names.

    >>> get_preset("gpt2").d_model
    768
    """
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise PresetNotFoundError(
            f"unknown preset {name!r}: {hint}available presets are {', '.join(PRESETS)}"
        ) from None
