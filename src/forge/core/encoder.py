"""A BERT-style bidirectional encoder: token ids in, hidden states or sentence embeddings out.

It runs sentence-embedding models such as all-MiniLM-L6-v2. Like the decoder
in ``transformer.py`` it knows nothing about tokenizers or files:
:func:`encoder_from_hf` maps a Hugging Face ``BertModel`` state dict (already
read by the caller) onto it.

>>> cfg = EncoderConfig(vocab_size=100, d_model=32, n_layer=2, n_head=4, d_ff=64, max_positions=16)
>>> enc = Encoder(cfg).eval()
>>> ids, mask = torch.tensor([[1, 5, 7, 2], [1, 9, 2, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()
>>> tuple(enc(ids, mask).shape), tuple(enc.embed(ids, mask).shape)
((2, 4, 32), (2, 32))

Tensor names, Hugging Face to Forge (``{i}`` is the layer; the ``bert.`` prefix is optional)::

    embeddings.word_embeddings, position_embeddings         tok_emb, pos_emb
    embeddings.token_type_embeddings                         type_emb
    embeddings.LayerNorm                                     emb_norm
    encoder.layer.{i}.attention.self.{query,key,value}       blocks.{i}.attn.qkv    rows [q; k; v]
    encoder.layer.{i}.attention.output.dense                 blocks.{i}.attn.proj
    encoder.layer.{i}.attention.output.LayerNorm             blocks.{i}.norm1
    encoder.layer.{i}.intermediate.dense                     blocks.{i}.mlp.up
    encoder.layer.{i}.output.dense                           blocks.{i}.mlp.down
    encoder.layer.{i}.output.LayerNorm                       blocks.{i}.norm2

The pooler and ``position_ids`` are not used (sentence embeddings mean-pool the
hidden states); ``.weight`` and ``.bias`` follow each name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from forge.core import ops
from forge.errors import CheckpointError, ConfigError, GenerationError

__all__ = ["ACTIVATIONS", "Encoder", "EncoderConfig", "encoder_from_hf"]

#: Activations the feed-forward block supports, by their Hugging Face ``hidden_act`` names.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh")


@dataclass(frozen=True, slots=True, kw_only=True)
class EncoderConfig:
    """Shape of a BERT-style encoder.

    >>> EncoderConfig(vocab_size=30522, d_model=384, n_layer=6, n_head=12, d_ff=1536, max_positions=512).head_dim
    32
    """

    vocab_size: int
    d_model: int
    n_layer: int
    n_head: int
    d_ff: int
    max_positions: int
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    #: "gelu" is the exact (erf) GELU BERT was trained with; the others are its tanh approximation.
    activation: str = "gelu"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "d_ff", "max_positions", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError.for_field("EncoderConfig", name, value, "a positive integer")
        if self.d_model % self.n_head:
            raise ConfigError.for_field("EncoderConfig", "d_model", self.d_model, f"a multiple of n_head={self.n_head}")
        if not self.norm_eps > 0:
            raise ConfigError.for_field("EncoderConfig", "norm_eps", self.norm_eps, "a positive float")
        if self.activation not in ACTIVATIONS:
            raise ConfigError.for_field("EncoderConfig", "activation", self.activation, f"one of {ACTIVATIONS}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def add(self, x: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """layer_norm(x + delta): post-LN adds the residual branch and normalises in one op."""
        return ops.add_layer_norm(x, delta, self.weight, self.bias, self.eps)[0]


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        # One fused projection for q, k and v, as in CausalSelfAttention: one matmul instead of three.
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = ops.linear(x, self.qkv.weight, self.qkv.bias)  # (B, T, 3 * d)
        q, k, v = qkv.view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        # keep (B, 1, 1, T) masks padded keys only; SDPA (in ops.attention) broadcasts it over heads and queries.
        y = ops.attention(q, k, v, causal=False, mask=keep)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, d)
        return ops.linear(y, self.proj.weight, self.proj.bias)


class FeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.exact = cfg.activation == "gelu"
        self.up = nn.Linear(cfg.d_model, cfg.d_ff)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ops.linear(x, self.up.weight, self.up.bias)
        # ops.gelu is GPT-2's tanh approximation; BERT was trained with the exact erf form.
        h = F.gelu(h) if self.exact else ops.gelu(h)
        return ops.linear(h, self.down.weight, self.down.bias)


class EncoderBlock(nn.Module):
    """Post-LN, as BERT: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.norm1 = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = FeedForward(cfg)
        self.norm2 = LayerNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.norm1.add(x, self.attn(x, keep))
        return self.norm2.add(x, self.mlp(x))


class Encoder(nn.Module):
    """Token ids (B, T) and a padding mask (B, T) to hidden states (B, T, d) or embeddings (B, d).

    ``mask`` is True at real tokens and False at padding; every row needs at
    least one real token. Token types are all 0 (single-sentence input).
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.emb_norm = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        if self.config.max_positions < T:  # the position table ends there
            raise GenerationError(
                f"input of {T} tokens is longer than the encoder's {self.config.max_positions} positions; truncate it"
            )
        pos = torch.arange(T, device=ids.device)
        x = self.tok_emb(ids) + self.pos_emb(pos) + self.type_emb.weight[0]  # (B, T, d)
        x = self.emb_norm.add(x, None)
        keep = mask.view(B, 1, 1, T)  # bool
        for block in self.blocks:
            x = block(x, keep)
        return x

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of the hidden states over real tokens, L2-normalised: (B, d) in fp32."""
        hidden = self(ids, mask).float()  # pool in fp32 whatever the weights' dtype
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        # The clamp and eps are sentence-transformers' own, so the numbers match it.
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, d)
        return F.normalize(pooled, p=2.0, dim=-1, eps=1e-12)


_HF_FIELDS = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "d_ff": "intermediate_size",
    "max_positions": "max_position_embeddings",
}
_LAYER_NAMES = {
    "attention.output.dense": "attn.proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "mlp.up",
    "output.dense": "mlp.down",
    "output.LayerNorm": "norm2",
}
_EMBEDDING_NAMES = {
    "embeddings.word_embeddings": "tok_emb",
    "embeddings.position_embeddings": "pos_emb",
    "embeddings.token_type_embeddings": "type_emb",
    "embeddings.LayerNorm": "emb_norm",
}
#: HF tensors an encoder has no use for: buffers, the pooler, pretraining heads.
_UNUSED = re.compile(r"^(embeddings\.position_ids|pooler\..*|cls\..*)$")


def encoder_config_from_hf(config: dict[str, Any]) -> EncoderConfig:
    """An :class:`EncoderConfig` from a Hugging Face BERT ``config.json`` dict."""
    if config.get("model_type", "bert") != "bert":
        raise CheckpointError(f"model_type {config['model_type']!r} is not supported; Forge's encoder reads BERT")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(
            f"position_embedding_type {config['position_embedding_type']!r} is not supported; only 'absolute'"
        )
    missing = [hf for hf in _HF_FIELDS.values() if hf not in config]
    if missing:
        raise CheckpointError(f"BERT config.json lacks {missing}; is this a BERT model folder?")
    act = config.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"hidden_act {act!r} is not supported; Forge's encoder runs {ACTIVATIONS}")
    try:
        return EncoderConfig(
            **{ours: config[hf] for ours, hf in _HF_FIELDS.items()},
            type_vocab_size=config.get("type_vocab_size", 2),
            norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            activation=act,
        )
    except ConfigError as e:
        raise CheckpointError(f"BERT config.json is invalid: {e}") from None


def _hf_to_forge(state_dict: dict[str, torch.Tensor], n_layer: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Forge's state dict (fp32, q/k/v fused), and the HF names that were neither used nor known to be unused."""
    sd = {k.removeprefix("bert."): v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for suffix in ("weight", "bias"):
        for hf, ours in _EMBEDDING_NAMES.items():
            if f"{hf}.{suffix}" in sd:
                out[f"{ours}.{suffix}"] = sd[f"{hf}.{suffix}"]
                used.add(f"{hf}.{suffix}")
        for i in range(n_layer):
            pre = f"encoder.layer.{i}."
            for hf, ours in _LAYER_NAMES.items():
                if f"{pre}{hf}.{suffix}" in sd:
                    out[f"blocks.{i}.{ours}.{suffix}"] = sd[f"{pre}{hf}.{suffix}"]
                    used.add(f"{pre}{hf}.{suffix}")
            qkv = [f"{pre}attention.self.{p}.{suffix}" for p in ("query", "key", "value")]
            if all(n in sd for n in qkv):
                out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat([sd[n].float() for n in qkv])  # rows [q; k; v]
                used.update(qkv)
    leftover = [k for k in sd if k not in used and not _UNUSED.match(k)]
    return {k: v.float() for k, v in out.items()}, leftover


def encoder_from_hf(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Encoder:
    """An :class:`Encoder` in eval mode, fp32 on the CPU, from a HF BERT config dict and state dict.

    Raises :class:`~forge.errors.CheckpointError` when tensors are missing, of
    the wrong shape, or left over (e.g. more layers than the config says).

    >>> from safetensors.torch import load_file  # doctest: +SKIP
    >>> enc = encoder_from_hf(json.load(open("config.json")), load_file("model.safetensors"))  # doctest: +SKIP
    """
    cfg = encoder_config_from_hf(config)
    with torch.device("meta"):  # no memory and no init for weights that are about to be replaced
        model = Encoder(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped, leftover = _hf_to_forge(state_dict, cfg.n_layer)
    missing = sorted(set(expected) - set(mapped))
    wrong = [f"{k} {tuple(v.shape)} != {expected[k]}" for k, v in mapped.items() if tuple(v.shape) != expected[k]]
    problems = {"missing (Forge names)": missing, "wrong shapes": wrong, "unexpected": leftover}
    if any(problems.values()):
        found = "; ".join(f"{what} {v[:4]}{' ...' if len(v) > 4 else ''}" for what, v in problems.items() if v)
        raise CheckpointError(
            f"BERT weights do not match their config.json: {found}; "
            "check that config.json and the weights come from the same model"
        )
    model.load_state_dict(mapped, strict=True, assign=True)
    return model.eval()
