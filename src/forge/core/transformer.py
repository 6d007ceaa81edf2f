"""A decoder-only transformer covering the GPT-2 and Llama families.

The model knows nothing about training or tokenizers: token ids in, logits out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from forge.config import ModelConfig
from forge.core import ops
from forge.core.attention import CausalSelfAttention, rope_tables
from forge.core.kv_cache import CacheWrite, KVCache, check_cache_fits
from forge.core.quantize import QuantizedWeight

__all__ = ["ROPE_INITIAL_LEN", "Transformer"]

#: RoPE tables start this many positions long and grow when a longer sequence or KV cache needs them: a
#: model file may declare millions of positions, and tables for all of them would be gigabytes before a token.
ROPE_INITIAL_LEN = 8192


class Norm(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        use_bias = cfg.norm == "layernorm" and cfg.bias
        self.bias = nn.Parameter(torch.zeros(cfg.d_model)) if use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(x, None)[0]

    def add(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + delta), x + delta): the residual add before a norm, fused with it where a kernel can."""
        if self.kind == "rmsnorm":
            return ops.add_rms_norm(x, delta, self.weight, self.eps)
        return ops.add_layer_norm(x, delta, self.weight, self.bias, self.eps)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
        self.swiglu = cfg.activation == "swiglu"
        # SwiGLU fuses gate and up projections into one matmul: (d, 2*ff).
        self.up = nn.Linear(cfg.d_model, cfg.ff_dim * (2 if self.swiglu else 1), bias=cfg.bias)
        self.down = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ops.linear(x, self.up.weight, self.up.bias)
        if self.swiglu:
            h = ops.swiglu(h)  # (.., 2 * ff) -> (.., ff)
        elif self.activation == "relu2":
            h = torch.relu(h).square()  # ReLU² (Primer; the modded-nanogpt speedrun)
        else:
            h = ops.gelu(h)
        return ops.linear(h, self.down.weight, self.down.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = Norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = Norm(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        write: CacheWrite | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream, this block's MLP output): the caller adds the second, fused with its next norm."""
        h, x = self.norm1.add(x, delta)  # x += the previous block's MLP output
        h, x = self.norm2.add(x, self.attn(h, rope, mask, write))
        return x, self.mlp(h)


class Transformer(nn.Module):
    """Token ids (B, T) to logits (B, T, vocab).

    >>> from forge.config import get_preset
    >>> m = Transformer(get_preset("tiny").replace(vocab_size=256))
    >>> tuple(m(torch.zeros(2, 5, dtype=torch.long)).shape)
    (2, 5, 256)
    """

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = Norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        if cfg.position == "rope":
            n = min(cfg.context_length, ROPE_INITIAL_LEN)  # (n, D), grown by ensure_positions
            self.register_buffer("rope_cos", torch.empty(n, cfg.head_dim), persistent=False)
            self.register_buffer("rope_sin", torch.empty(n, cfg.head_dim), persistent=False)
        self.gradient_checkpointing = False
        self.reset_parameters()
        self.reset_buffers()

    def tie_weights(self) -> None:
        """Share the input embedding with the output projection, if the config ties them.

        Weight tying saves vocab*d parameters and helps small models (Press & Wolf, 2017).
        Call again after ``to_empty()``, which allocates every parameter separately.
        """
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (RoPE tables), e.g. after ``to_empty()``."""
        if self.config.position == "rope":
            cfg = self.config
            cos, sin = rope_tables(cfg.head_dim, self.rope_cos.shape[0], cfg.rope_theta, cfg.rope_scaling)
            with torch.no_grad():
                self.rope_cos.copy_(cos)
                self.rope_sin.copy_(sin)

    def ensure_positions(self, n: int) -> None:
        """Make the RoPE tables cover positions [0, n) (at most the context length); see :data:`ROPE_INITIAL_LEN`."""
        if self.config.position == "rope" and n > self.rope_cos.shape[0]:
            # A rare, eager step: a compiled graph just breaks here. Applied at the call, not as a
            # decorator: decorating imports torch._dynamo (and Triton) with this module, a second at start.
            torch.compiler.disable(self._grow_rope)(n)

    def _grow_rope(self, n: int) -> None:
        cfg, old = self.config, self.rope_cos
        size = min(cfg.context_length, max(n, 2 * old.shape[0]))  # doubling: few regrowths
        cos, sin = rope_tables(cfg.head_dim, size, cfg.rope_theta, cfg.rope_scaling)
        self.rope_cos, self.rope_sin = cos.to(old.device, old.dtype), sin.to(old.device, old.dtype)
        # CUDA graphs captured on this model (the batchers kept by forge.core.decode) read the old tables' memory.
        self.__dict__.pop("_decode_graphs", None)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), with residual projections scaled by 1/sqrt(2L)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # Each block adds two residual branches; scaling keeps the residual
        # stream's variance from growing with depth (GPT-2 paper, section 2.3).
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.mlp.down.weight, mean=0.0, std=std)

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Parameter count; tied weights count once, and a quantized weight counts its (out, in) values."""
        n = sum(p.numel() for p in self.parameters())
        n += sum(m.shape.numel() for m in self.modules() if isinstance(m, QuantizedWeight))
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    # -- KV cache -----------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int, *, dtype: torch.dtype | None = None) -> None:
        """Preallocate a KV cache of ``max_len`` positions in every layer."""
        self.use_caches(self.make_caches(batch, max_len, dtype=dtype))

    def make_caches(
        self, batch: int, max_len: int, *, dtype: torch.dtype | None = None, lazy: bool = False
    ) -> list[KVCache]:
        """One KV cache per layer, not installed (see :meth:`use_caches`).

        ``lazy``: leave the buffers uninitialised, so that on a CPU only the pages written take memory.
        Only for callers that never read a position before writing it.
        """
        cfg = self.config
        device = self.tok_emb.weight.device
        dtype = dtype or self.tok_emb.weight.dtype
        if not lazy:
            check_cache_fits(cfg, batch, max_len, dtype, device)
        self.ensure_positions(max_len)  # before any graph captures a read of the tables
        make = torch.empty if lazy else torch.zeros  # empty: untouched pages cost no memory
        # Every layer's keys and values are views of one buffer (see kv_cache.stacked).
        whole = make((len(self.blocks), 2, batch, cfg.kv_heads, max_len, cfg.head_dim), dtype=dtype, device=device)
        return [
            KVCache(
                batch=batch,
                n_kv_head=cfg.kv_heads,
                max_len=max_len,
                head_dim=cfg.head_dim,
                dtype=dtype,
                device=device,
                buffers=(whole[layer, 0], whole[layer, 1]),
            )
            for layer in range(len(self.blocks))
        ]

    def use_caches(self, caches: list[KVCache] | None) -> None:
        """Install per-layer caches (None removes them): a batching engine keeps its own between steps."""
        for i, block in enumerate(self.blocks):
            block.attn.cache = caches[i] if caches is not None else None

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.cache = None

    # -- forward --------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        write: CacheWrite | None = None,
        last_only: bool = False,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for token ids ``idx`` (B, T).

        positions: (B, T) or (T,) absolute positions; default ``arange(T)`` from ``write.pos`` when that is an int.
        mask: boolean (B, 1, T, Tk), True = may attend; default causal.
        write: write keys/values into the installed KV caches as it says (see ``use_caches``); with
            per-row positions (a tensor ``write.pos``), ``positions`` must be given.
        last_only: return logits of the last position only, (B, 1, vocab).
        select: (B,) one position per row whose logits to return, (B, 1, vocab) (a padded batch's last tokens).
        """
        x, delta = self._trunk(idx, positions, mask, write)  # (B, T, d) each
        if last_only:
            x, delta = x[:, -1:, :], delta[:, -1:, :]
        elif select is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            x, delta = x[rows, select][:, None], delta[rows, select][:, None]  # (B, 1, d)
        x = self.norm.add(x, delta)[0]  # after the slice: only the rows that get logits
        return self.head(x)  # (B, T, vocab)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of final normalised hidden states ``h`` (..., d): the output head, soft-capped if configured."""
        logits = ops.linear(h, self.lm_head.weight)
        cap = self.config.logit_softcap
        if cap is None:
            return logits
        return (cap * torch.tanh(logits.float() / cap)).to(logits.dtype)

    def hidden(self, idx: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final normalised hidden states (B, T, d): what the output head sees (used for embeddings)."""
        return self.norm.add(*self._trunk(idx, None, mask, None))[0]

    def _trunk(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None,
        mask: torch.Tensor | None,
        write: CacheWrite | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings through every block: the residual stream (B, T, d) and the last MLP output still to add."""
        T = idx.shape[1]
        start = write.pos if write is not None and isinstance(write.pos, int) else 0
        if positions is None:
            assert write is None or isinstance(write.pos, int), "per-row cache positions need per-row positions"
            positions = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = ops.embedding(idx, self.tok_emb.weight)  # (B, T, d); a GGUF's weight stays quantized
        # Positions past start + T come only with a KV cache, whose make_caches grew the tables.
        self.ensure_positions(start + T)
        rope = None
        if self.pos_emb is not None:
            x = x + ops.embedding(positions, self.pos_emb.weight)
        else:
            # (T, D) -> (1, 1, T, D) or (B, T, D) -> (B, 1, T, D)
            rope = (self.rope_cos[positions].unsqueeze(-3), self.rope_sin[positions].unsqueeze(-3))
            if positions.dim() == 1:
                rope = (rope[0].unsqueeze(0), rope[1].unsqueeze(0))
        x = self.drop(x)
        delta = None
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x, delta = checkpoint(block, x, delta, rope, mask, write, use_reentrant=False)
            else:
                x, delta = block(x, delta, rope, mask, write)
        assert delta is not None, "a model has at least one block"
        return x, delta

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean next-token cross-entropy, computed in fp32 for stability; with ``label_smoothing`` e, against
        targets that put e of their mass evenly on the whole vocabulary (F.cross_entropy's definition).

        On GPUs the output head and the loss are one fused kernel that never holds the full logits. Smoothing adds
        ``e * (z_target - mean_j z_j)`` a row, where ``mean_j z_j`` is h times the mean row of the head: no logits.
        """
        h = self.norm.add(*self._trunk(idx, None, None, None))[0]  # (B, T, d)
        flat = targets.reshape(-1)
        if self.config.logit_softcap is not None:  # the fused kernel has no cap: the logits are materialised
            logits = self.head(h).float().reshape(-1, self.config.vocab_size)
            return F.cross_entropy(logits, flat, label_smoothing=label_smoothing)
        rows, weight = h.reshape(-1, h.shape[-1]), self.lm_head.weight
        loss = ops.linear_cross_entropy(rows, weight, flat)
        if label_smoothing:
            margin = (rows.float() * (weight[flat].float() - weight.float().mean(0))).sum(-1)
            loss = loss + label_smoothing * margin.mean()
        return loss
