"""Model configuration, the preset registry, and how every option is defined once.

``ModelConfig`` describes a decoder-only transformer of either family:

* GPT-2 style: LayerNorm, GELU MLP, learned absolute positions, biases.
* Llama style: RMSNorm, SwiGLU MLP, rotary positions (RoPE), grouped-query attention.

Presets are matched by exact name; a miss suggests close names.

>>> cfg = get_preset("tiny")
>>> cfg.family, cfg.n_layer
('gpt2', 4)

The options of ``SamplingParams``, ``GenerationConfig``, ``TrainConfig`` and
``ServerConfig`` are dataclass fields whose metadata is a :class:`Spec`: the
help text, and the :class:`Bound` or the choices that ``__post_init__`` checks
(:func:`check_specs`). The CLI builds its flags from them and the server's
schema its ranges; tests/test_options.py checks that every surface agrees.
There is one dtype vocabulary, :data:`DTYPES`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from forge.errors import ConfigError, PresetNotFoundError

__all__ = [
    "DTYPES",
    "DTYPE_ALIASES",
    "INFERENCE_DTYPES",
    "MAX_SIZES",
    "PRESETS",
    "Bound",
    "ModelConfig",
    "Spec",
    "bounded",
    "check_specs",
    "choice",
    "documented",
    "dtype_name",
    "get_preset",
    "preset_names",
    "register_preset",
    "same_as",
    "specs",
]

Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "swiglu", "relu2"]
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
    d_ff: int | None = None  # None: 4*d_model for GELU and ReLU², ~8/3*d_model (rounded) for SwiGLU
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
    #: RMS-normalise each head's queries and keys (a learned gain per head dim, as Qwen3) before RoPE.
    qk_norm: bool = False
    #: Squash the logits as ``cap * tanh(logits / cap)`` (Gemma 2's soft-capping); None: off.
    logit_softcap: float | None = None

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
            ("activation", ("gelu", "swiglu", "relu2")),
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
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ConfigError.for_field(
                "ModelConfig", "logit_softcap", self.logit_softcap, "must be > 0 (e.g. 30), or None for no cap"
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
        if self.activation in ("gelu", "relu2"):
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


# -- options: each defined once, as a dataclass field whose metadata holds its help and bounds -----

_SPEC = "forge.spec"


@dataclass(frozen=True, slots=True, kw_only=True)
class Bound:
    """The values a numeric option takes: integers (or finite numbers) in an interval, and None if ``optional``.

    >>> Bound(ge=0, le=2).describe(), Bound(integer=True, ge=1, optional=True).describe()
    ('must be a number in [0, 2]', 'must be an integer >= 1, or None')
    >>> Bound(ge=0, le=2).within(Bound(ge=0)), Bound(ge=0).within(Bound(gt=0))
    (True, False)
    """

    integer: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    optional: bool = False

    def allows(self, value: object) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not self.integer and not math.isfinite(value):
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    @property
    def low(self) -> tuple[float, bool]:
        """The lower end and whether it is open (excluded)."""
        if self.ge is not None:
            return self.ge, False
        return (self.gt, True) if self.gt is not None else (-math.inf, True)

    @property
    def high(self) -> tuple[float, bool]:
        """The upper end and whether it is open (excluded)."""
        if self.le is not None:
            return self.le, False
        return (self.lt, True) if self.lt is not None else (math.inf, True)

    def within(self, other: Bound) -> bool:
        """Whether every value this bound allows, ``other`` allows too."""
        (lo, lo_open), (olo, olo_open) = self.low, other.low
        (hi, hi_open), (ohi, ohi_open) = self.high, other.high
        return (
            (self.integer or not other.integer)
            and (other.optional or not self.optional)
            and (lo > olo or (lo == olo and (lo_open or not olo_open)))
            and (hi < ohi or (hi == ohi and (hi_open or not ohi_open)))
        )

    def describe(self) -> str:
        (lo, lo_open), (hi, hi_open) = self.low, self.high
        kind = "an integer" if self.integer else "a number"
        if math.isfinite(lo) and math.isfinite(hi):
            text = f"{kind} in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
        elif math.isfinite(lo):
            text = f"{kind} {'>' if lo_open else '>='} {_num(lo)}"
        elif math.isfinite(hi):
            text = f"{kind} {'<' if hi_open else '<='} {_num(hi)}"
        else:
            text = kind
        return f"must be {text}" + (", or None" if self.optional else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Spec:
    """What one option is: its help text, and the :class:`Bound` or the choices (with accepted aliases) it takes."""

    doc: str
    bound: Bound | None = None
    choices: tuple[str, ...] = ()
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def canonical(self, value: object) -> object:
        """``value`` with an alias replaced by the name it stands for."""
        return self.aliases.get(value, value) if isinstance(value, str) else value


def documented(default: Any = dataclasses.MISSING, *, doc: str, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with help text and no bound (a string, a flag, an object)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_SPEC: Spec(doc=doc)})


def bounded(
    default: Any,
    *,
    doc: str,
    integer: bool = False,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    optional: bool | None = None,
) -> Any:
    """A numeric dataclass field and its bounds (None is allowed when the default is None, or ``optional``).

    >>> @dataclass(frozen=True)
    ... class Knob:
    ...     level: float = bounded(1.0, ge=0, le=2, doc="How loud.")
    ...     def __post_init__(self) -> None:
    ...         check_specs(self)
    >>> Knob(level=3)
    Traceback (most recent call last):
    ...
    forge.errors.ConfigError: Knob.level = 3 is invalid: must be a number in [0, 2]
    """
    optional = default is None if optional is None else optional
    bound = Bound(integer=integer, ge=ge, gt=gt, le=le, lt=lt, optional=optional)
    return dataclasses.field(default=default, metadata={_SPEC: Spec(doc=doc, bound=bound)})


def choice(default: str, choices: tuple[str, ...], *, doc: str, aliases: Mapping[str, str] | None = None) -> Any:
    """A dataclass field that takes one of ``choices``; ``aliases`` (other spellings) become the name they stand for."""
    spec = Spec(doc=doc, choices=choices, aliases={a: c for a, c in (aliases or {}).items() if c in choices})
    return dataclasses.field(default=default, metadata={_SPEC: spec})


def same_as(owner: type, name: str, default: Any) -> Any:
    """A field defined as ``owner.name`` is, with another default: one option that two dataclasses share."""
    return dataclasses.field(default=default, metadata={_SPEC: specs(owner)[name]})


def specs(cls: type) -> dict[str, Spec]:
    """The :class:`Spec` of each option of dataclass ``cls``, by field name."""
    return {f.name: f.metadata[_SPEC] for f in dataclasses.fields(cls) if _SPEC in f.metadata}


def check_specs(obj: Any) -> None:
    """Check every option of a dataclass instance against its spec (aliases become their names); a ConfigError."""
    owner = type(obj).__name__
    for name, spec in specs(type(obj)).items():
        value = getattr(obj, name)
        if spec.bound is not None and not spec.bound.allows(value):
            raise ConfigError.for_field(owner, name, value, spec.bound.describe())
        if spec.choices:
            canonical = spec.canonical(value)
            if canonical not in spec.choices:
                also = f" (also accepted: {', '.join(spec.aliases)})" if spec.aliases else ""
                raise ConfigError.for_field(owner, name, value, f"use one of {', '.join(spec.choices)}{also}")
            if canonical != value:
                object.__setattr__(obj, name, canonical)


#: The one dtype vocabulary. Each command and function takes the part it supports: inference
#: ``auto|float32|bfloat16``, training precision the same, export ``float32|float16|bfloat16|q8_0|q4_0|q4_1``
#: (GGUF) and ``float32|int8|int4`` (ONNX: the ``quantize=`` schemes' names, see forge.core.formats.onnx).
DTYPES = ("auto", "float32", "bfloat16", "float16", "q8_0", "q4_0", "q4_1", "int8", "int4")
#: What inference runs in (``Forge(dtype=...)``, ``--dtype``): float16 is left out, slow and lossy on CPUs.
INFERENCE_DTYPES = ("auto", "float32", "bfloat16")
#: Shorter spellings accepted everywhere for compatibility (the old ``--precision bf16|fp32`` and GGUF's ``f16``).
DTYPE_ALIASES: Mapping[str, str] = {
    "fp32": "float32",
    "f32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
}


def dtype_name(value: object, allowed: tuple[str, ...], *, owner: str, field: str) -> str:
    """``value`` as its name in :data:`DTYPES` (an alias becomes the name), if ``allowed``; else a ConfigError.

    >>> dtype_name("bf16", ("auto", "float32", "bfloat16"), owner="Forge", field="dtype")
    'bfloat16'
    """
    name = DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value
    if name not in allowed:
        raise ConfigError.for_field(owner, field, value, f"use one of {', '.join(allowed)}")
    assert isinstance(name, str)
    return name
