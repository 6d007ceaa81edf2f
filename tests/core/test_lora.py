"""LoRA adapters: exact start, only adapters train, merge equals the adapted model, training runs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from forge.config import ModelConfig
from forge.core.lora import DEFAULT_TARGETS, apply_lora, has_lora, merge_lora, merged_copy
from forge.core.transformer import Transformer
from forge.errors import ConfigError
from forge.events import Event, StepEvent
from forge.models import load, padded_vocab, save
from forge.tokenizer import Tokenizer
from forge.trainer import train


@pytest.fixture
def model(small_config: Callable[..., ModelConfig], peaked_model: Callable[..., Transformer]) -> Transformer:
    return peaked_model(small_config("llama"))


def ids(cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_an_adapted_model_starts_exactly_where_it_was(model: Transformer) -> None:
    x = ids(model.config)
    before = model(x)
    apply_lora(model, rank=4)
    assert has_lora(model)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_only_the_adapters_train(model: Transformer) -> None:
    cfg = model.config
    trainable = apply_lora(model, rank=4)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith((".A", ".B")) for n in names)
    # r * (in + out) for each adapted layer: qkv, proj, up (gate+up) and down in every block.
    qkv_out = (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim
    per_block = 4 * (cfg.d_model + qkv_out) + 4 * (2 * cfg.d_model) + 4 * (cfg.d_model + 2 * cfg.ff_dim)
    per_block += 4 * (cfg.ff_dim + cfg.d_model)
    assert trainable == cfg.n_layer * per_block == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_a_step_changes_the_output_but_not_the_frozen_weights(model: Transformer) -> None:
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4)
    x = ids(model.config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = model(x).detach()
    for _ in range(3):
        opt.zero_grad()
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
    assert not torch.allclose(model(x), before)
    originals = {k.replace(".parametrizations.weight.original", ".weight"): v for k, v in model.state_dict().items()}
    for k, v in frozen.items():
        torch.testing.assert_close(originals[k], v, rtol=0, atol=0)


def test_merge_gives_the_adapted_model_as_a_plain_one(model: Transformer) -> None:
    apply_lora(model, rank=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_(0, 0.05)
    x = ids(model.config)
    adapted = model(x).detach()
    copy = merged_copy(model)
    assert has_lora(model) and not has_lora(copy)
    merge_lora(model)
    assert not has_lora(model)
    assert set(model.state_dict()) == set(Transformer(model.config).state_dict())
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(copy(x), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("rank", "match"), [(0, "positive integer"), (1000, "larger than layer")])
def test_bad_ranks_are_config_errors(model: Transformer, rank: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_lora(model, rank=rank)


def test_adapting_twice_is_a_config_error(model: Transformer) -> None:
    apply_lora(model, rank=2)
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(model, rank=2)


def test_unknown_targets_are_a_config_error(model: Transformer) -> None:
    with pytest.raises(ConfigError, match=str(DEFAULT_TARGETS[0])):
        apply_lora(model, rank=2, targets=("nope",))


def test_lora_training_fine_tunes_and_saves_a_plain_checkpoint(
    tmp_path: Path, hamlet_text: str, bpe_tokenizer: Tokenizer
) -> None:
    from forge.models import create_model, padded_vocab

    torch.manual_seed(0)
    base = create_model("llama-tiny", vocab_size=padded_vocab(bpe_tokenizer.vocab_size))
    embedding = base.tok_emb.weight.detach().clone()
    options = dict(steps=4, batch_size=2, context=32, eval_batches=2, eval_every=0, precision="fp32", lr=1e-2)
    result = train([hamlet_text], model=base, tokenizer=bpe_tokenizer, out=tmp_path / "ft", lora_rank=4, **options)
    assert not has_lora(result.model)
    torch.testing.assert_close(result.model.tok_emb.weight, embedding, rtol=0, atol=0)  # frozen: not adapted
    assert result.evals[-1][1] < result.evals[0][1]
    loaded = load(tmp_path / "ft", with_state=True)
    x = torch.randint(0, bpe_tokenizer.vocab_size, (1, 16))
    torch.testing.assert_close(loaded.model(x), result.model(x))
    assert not has_lora(loaded.model)  # loaded plain: the saved adapters are merged
    assert "optimizer" in (loaded.training_state or {})  # the adapters' optimizer state, for a resume
    save(tmp_path / "again", loaded.model, loaded.tokenizer)  # a plain model saves like any other


# -- seeded adapters, saved and resumed exactly (issue 14) ------------------------------------------------------

LORA_TEXT = ["to be, or not to be: that is the question.\n" * 80]
LORA_RUN = dict(batch_size=2, context=16, eval_batches=1, eval_every=0, precision="fp32", device="cpu", lr=1e-2)


def _base(small_config: Callable[..., ModelConfig], tokenizer: Tokenizer) -> Transformer:
    torch.manual_seed(0)
    return Transformer(small_config("llama", vocab_size=padded_vocab(tokenizer.vocab_size)))


def _losses(into: list[tuple[int, float]]) -> Callable[[Event], None]:
    return lambda e: into.append((e.step, e.loss)) if isinstance(e, StepEvent) else None


def test_lora_adapters_follow_the_seed_not_the_global_rng(
    small_config: Callable[..., ModelConfig], char_tokenizer: Tokenizer
) -> None:
    base = _base(small_config, char_tokenizer)
    runs = []
    for global_seed, seed in ((1, 7), (2, 7), (3, 8)):
        torch.manual_seed(global_seed)  # what a preset-less (--from) run used to draw its adapters from
        losses: list[tuple[int, float]] = []
        model = copy.deepcopy(base)
        train(
            LORA_TEXT,
            model=model,
            tokenizer=char_tokenizer,
            steps=3,
            seed=seed,
            lora_rank=2,
            listeners=[_losses(losses)],
            **LORA_RUN,
        )
        runs.append(losses)
    assert runs[0] == runs[1]  # the same --seed: the same adapters, the same losses
    assert runs[0] != runs[2]


def test_a_resumed_lora_run_equals_an_uninterrupted_one(
    tmp_path: Path, small_config: Callable[..., ModelConfig], char_tokenizer: Tokenizer
) -> None:
    base = _base(small_config, char_tokenizer)
    whole: list[tuple[int, float]] = []
    done = train(
        LORA_TEXT,
        model=copy.deepcopy(base),
        tokenizer=char_tokenizer,
        steps=6,
        lora_rank=2,
        listeners=[_losses(whole)],
        **LORA_RUN,
    )

    def interrupt_at_3(event: Event) -> None:
        if isinstance(event, StepEvent) and event.step == 3:
            raise KeyboardInterrupt

    first: list[tuple[int, float]] = []
    out = tmp_path / "ft"
    stopped = train(
        LORA_TEXT,
        model=copy.deepcopy(base),
        tokenizer=char_tokenizer,
        steps=6,
        lora_rank=2,
        out=out,
        listeners=[_losses(first), interrupt_at_3],
        **LORA_RUN,
    )
    assert stopped.interrupted and stopped.step == 3
    saved = load(out, with_state=True, keep_adapters=True)
    assert has_lora(saved.model)  # the adapters themselves, not only their merged result
    assert saved.training_state is not None and "optimizer" in saved.training_state

    second: list[tuple[int, float]] = []
    resumed = train(LORA_TEXT, resume=out, steps=6, listeners=[_losses(second)], **LORA_RUN)  # lora rank from the file
    assert first + second == whole  # bit-exact: the same adapters, optimizer state and data
    assert not has_lora(resumed.model)
    for name, value in done.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    x = torch.randint(0, char_tokenizer.vocab_size, (1, 8))
    assert torch.equal(load(out).model(x), done.model(x))  # the final checkpoint loads as the merged model
