"""The training loop: events, listeners, options, resuming exactly, and learning for real."""

from __future__ import annotations

import logging
import math
import random
import shutil
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import forge.trainer as trainer_module
from forge.budget import compile_pays
from forge.data import Corpus, TokenDataset
from forge.errors import CheckpointError, ConfigError
from forge.events import CheckpointEvent, EndEvent, EvalEvent, Event, StartEvent, StepEvent
from forge.models import create_model, load, padded_vocab
from forge.runs import BestWeights
from forge.tokenizer import Tokenizer
from forge.trainer import TrainConfig, Trainer, train

#: A small in-memory corpus: char tokenizer, a few thousand tokens.
TEXT = ["to be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 60]
FAST = {"preset": "tiny", "tokenizer": "char", "batch_size": 2, "context": 16, "device": "cpu", "precision": "fp32"}


class Recorder:
    """A listener that keeps every event."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.events]

    def of(self, kind: type[Event]) -> list:  # type: ignore[type-arg]
        return [e for e in self.events if isinstance(e, kind)]


def _compact(names: list[str]) -> list[str]:
    """Collapse runs of "step" into one entry, to compare event orders readably."""
    out: list[str] = []
    for n in names:
        if not (n == "step" and out and out[-1] == "step"):
            out.append(n)
    return out


# -- events -------------------------------------------------------------------------
def test_event_order(tmp_path: Path) -> None:
    rec = Recorder()
    result = train(TEXT, steps=10, eval_every=5, out=tmp_path / "run", listeners=[rec], **FAST)
    assert _compact(rec.names) == ["start", "eval", "step", "eval", "step", "eval", "checkpoint", "end"]
    assert [e.step for e in rec.of(EvalEvent)] == [0, 5, 10]
    assert [e.step for e in rec.of(StepEvent)] == list(range(1, 11))
    assert [e.step for e in rec.of(CheckpointEvent)] == [10]
    assert rec.of(CheckpointEvent)[0].path == str(tmp_path / "run")
    assert result.step == 10
    assert result.checkpoint == tmp_path / "run"
    assert not result.interrupted


def test_event_payloads(tmp_path: Path) -> None:
    rec = Recorder()
    result = train(TEXT, steps=6, eval_every=3, grad_accum=2, listeners=[rec], **FAST)
    [start] = rec.of(StartEvent)
    assert start.start_step == 0
    assert start.total_steps == 6
    assert start.parameters == result.model.num_params()
    assert start.device == "cpu"
    assert start.precision == "float32"
    assert start.tokens_per_step == 2 * 16 * 2
    assert start.train_tokens > start.val_tokens > 0
    steps = rec.of(StepEvent)
    assert [(e.step, e.loss) for e in steps] == result.losses
    assert all(e.total_steps == 6 and math.isfinite(e.grad_norm) and e.grad_norm > 0 for e in steps)
    schedule = TrainConfig(steps=6).schedule_for()
    assert [e.lr for e in steps] == pytest.approx([schedule(i) for i in range(6)])
    evals = rec.of(EvalEvent)
    assert [(e.step, e.val_loss) for e in evals] == result.evals
    assert all(e.val_perplexity == pytest.approx(math.exp(e.val_loss)) for e in evals)
    [end] = rec.of(EndEvent)
    assert (end.step, end.train_loss, end.val_loss, end.interrupted) == (6, result.train_loss, result.val_loss, False)


def test_eval_every_zero_evaluates_at_start_and_end() -> None:
    """TrainConfig documents ``eval_every = 0`` as "only at the start and the end"."""
    rec = Recorder()
    train(TEXT, steps=4, eval_every=0, listeners=[rec], **FAST)
    assert [e.step for e in rec.of(EvalEvent)] == [0, 4]


def test_label_smoothing_shapes_the_training_loss_not_the_validation_loss() -> None:
    """The same seed and batches: the first step's loss is the smoothed one, the evaluation before any step is the
    plain cross-entropy either way (the same weights), and the runs then part."""
    runs = {e: train(TEXT, steps=3, eval_every=0, label_smoothing=e, **FAST) for e in (0.0, 0.3)}
    plain, smoothed = runs[0.0], runs[0.3]
    assert plain.evals[0] == smoothed.evals[0]
    assert smoothed.losses[0][1] != plain.losses[0][1]
    assert plain.evals[-1] != smoothed.evals[-1]


def _overfitting_text() -> list[str]:
    """Training text of six words, validation text of twelve: the run learns, then overfits the six."""
    rng = random.Random(0)
    words = ["the", "king", "queen", "lord", "lady", "sword", "crown", "castle", "night", "day", "love", "death"]
    train_part = " ".join(rng.choice(words[:6]) for _ in range(1500))
    return [train_part + ". " + " ".join(rng.choice(words) for _ in range(200))]


def test_keep_best_ends_with_the_weights_of_the_best_evaluation() -> None:
    # A constant learning rate: the first N steps of a long run are a run of N steps, weight for weight.
    options = FAST | {"batch_size": 8, "context": 32, "lr": 1e-2, "schedule": "constant", "warmup": 0}
    rec = Recorder()
    kept = train(_overfitting_text(), steps=300, eval_every=20, listeners=[rec], **options)
    evals = dict(kept.evals)
    best_step = min(evals, key=evals.__getitem__)
    assert evals[best_step] < evals[300]  # the run got worse on new text after its best evaluation
    assert kept.kept == (best_step, evals[best_step]) and kept.val_loss == evals[best_step]
    assert rec.of(EndEvent)[-1].kept_step == best_step
    again = train(_overfitting_text(), steps=best_step, eval_every=0, **options)
    for (name, a), b in zip(kept.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    last = train(_overfitting_text(), steps=300, eval_every=20, keep_best=False, **options)
    assert last.kept is None and last.val_loss == evals[300] and last.evals == kept.evals
    assert any(not torch.equal(a, b) for a, b in zip(kept.model.parameters(), last.model.parameters(), strict=True))


def test_keep_best_keeps_the_last_weights_when_they_are_the_best() -> None:
    rec = Recorder()
    result = train(TEXT, steps=6, eval_every=3, listeners=[rec], **FAST)
    assert result.kept is None and rec.of(EndEvent)[-1].kept_step is None
    assert result.val_loss == result.evals[-1][1] == min(v for _, v in result.evals)


def test_checkpoint_every(tmp_path: Path) -> None:
    rec = Recorder()
    train(TEXT, steps=10, eval_every=0, checkpoint_every=4, out=tmp_path / "run", listeners=[rec], **FAST)
    assert [e.step for e in rec.of(CheckpointEvent)] == [4, 8, 10]
    assert load(tmp_path / "run", with_state=True).step == 10


def test_no_out_means_no_checkpoint(tmp_path: Path) -> None:
    rec = Recorder()
    result = train(TEXT, steps=3, eval_every=0, listeners=[rec], **FAST)
    assert rec.of(CheckpointEvent) == []
    assert result.checkpoint is None


def test_listener_exceptions_do_not_stop_training(caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError(f"listener bug on {event.name}")

    rec = Recorder()
    with caplog.at_level(logging.ERROR, logger="forge"):
        result = train(TEXT, steps=5, eval_every=5, listeners=[broken, rec], **FAST)
    assert result.step == 5
    assert len(result.losses) == 5
    assert rec.names[0] == "start" and rec.names[-1] == "end"  # later listeners still see every event
    assert "listener bug on step" in caplog.text


def test_keyboard_interrupt_saves_and_reports(tmp_path: Path) -> None:
    def interrupt(event: Event) -> None:
        if isinstance(event, StepEvent) and event.step == 3:
            raise KeyboardInterrupt

    rec = Recorder()
    result = train(TEXT, steps=10, eval_every=0, out=tmp_path / "run", listeners=[interrupt, rec], **FAST)
    assert result.interrupted
    assert result.step == 3
    assert rec.names[-2:] == ["checkpoint", "end"]
    assert rec.of(EndEvent)[0].interrupted
    assert load(tmp_path / "run", with_state=True).step == 3


# -- options ------------------------------------------------------------------------
def test_grad_accum_gives_finite_losses_that_fall() -> None:
    result = train(TEXT, steps=30, eval_every=0, grad_accum=3, lr=3e-3, **FAST)
    losses = [loss for _, loss in result.losses]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5


def test_grad_accum_averages_micro_batches() -> None:
    """With grad_accum=2 the reported loss is the mean of the two micro-batch losses."""
    torch.manual_seed(0)
    tok = Tokenizer.train(TEXT, kind="char")
    dataset = TokenDataset.build(Corpus.from_source(TEXT), tok)
    model = create_model("tiny", vocab_size=padded_vocab(tok.vocab_size), n_layer=1)
    reference = create_model("tiny", vocab_size=padded_vocab(tok.vocab_size), n_layer=1)
    reference.load_state_dict(model.state_dict())
    cfg = TrainConfig(steps=1, batch_size=2, context=16, grad_accum=2, eval_every=0, precision="fp32", seed=3)
    result = Trainer(model, tok, dataset, cfg, device=torch.device("cpu")).run()
    rng = torch.Generator().manual_seed(3)
    batches = [dataset.batch("train", 2, 16, rng) for _ in range(2)]
    with torch.no_grad():
        expected = sum(reference.loss(x, y).item() for x, y in batches) / 2
    assert result.losses[0][1] == pytest.approx(expected, rel=1e-5)


def test_gradient_checkpointing_trains_the_same() -> None:
    plain = train(TEXT, steps=3, eval_every=0, seed=1, **FAST)
    checkpointed = train(TEXT, steps=3, eval_every=0, seed=1, gradient_checkpointing=True, **FAST)
    assert [loss for _, loss in checkpointed.losses] == pytest.approx([loss for _, loss in plain.losses], rel=1e-5)


def test_compiled_step_trains_the_same(tmp_path: Path) -> None:
    """--compile runs the step under torch.compile (Inductor on CPUs too): same losses, a plain checkpoint."""
    plain_events, compiled_events = Recorder(), Recorder()
    plain = train(TEXT, steps=4, eval_every=0, seed=1, listeners=[plain_events], **FAST)
    counters.clear()
    compiled = train(
        TEXT, steps=4, eval_every=0, seed=1, compile=True, out=tmp_path / "run", listeners=[compiled_events], **FAST
    )
    assert compiled_events.of(StartEvent)[0].compiled and not plain_events.of(StartEvent)[0].compiled
    # One graph, the training step's: the evaluations (at step 0 and at the end) stay eager on a CPU.
    assert len(compiled.evals) == 2 and counters["stats"]["unique_graphs"] == 1
    assert [loss for _, loss in compiled.losses] == pytest.approx([loss for _, loss in plain.losses], rel=1e-4)
    reloaded = load(tmp_path / "run").model  # saved weights carry no compile wrapper prefixes
    for name, tensor in compiled.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    ("device", "seconds", "compiler", "compiled"),
    [
        ("cuda", None, None, True),
        ("cpu", 120.0, "/usr/bin/g++", True),
        ("cpu", 60.0, "/usr/bin/g++", False),  # the compile would eat what it saves
        ("cpu", None, "/usr/bin/g++", False),  # a step count: no budget to weigh it against
        ("cpu", 120.0, None, False),  # Inductor needs a C++ compiler on a CPU
        ("mps", 120.0, "/usr/bin/g++", False),
    ],
)
def test_compile_none_compiles_where_it_pays(
    monkeypatch: pytest.MonkeyPatch, device: str, seconds: float | None, compiler: str | None, compiled: bool
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: compiler)
    assert compile_pays(device, seconds) is compiled


def test_compile_none_stays_eager_without_pythons_headers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Inductor's CPU kernels include Python.h: a Python without its headers (no python3-dev) trains eagerly."""
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/g++")
    real = sysconfig.get_path
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: str(tmp_path) if name == "include" else real(name))
    assert not compile_pays("cpu", 120.0)
    (tmp_path / "Python.h").write_text("")
    assert compile_pays("cpu", 120.0)


def test_a_cpu_time_budget_worth_a_compile_compiles_the_step() -> None:
    tok = Tokenizer.train(TEXT, kind="char")
    dataset = TokenDataset.build(Corpus.from_source(TEXT), tok)
    model = create_model("tiny", vocab_size=padded_vocab(tok.vocab_size), n_layer=1)
    cpu = torch.device("cpu")
    for config, compiled in ((TrainConfig(time="2m"), compile_pays("cpu", 120.0)), (TrainConfig(), False)):
        assert Trainer(model, tok, dataset, config, device=cpu).compiled is compiled
    assert not Trainer(model, tok, dataset, TrainConfig(time="2m", compile=False), device=cpu).compiled


def test_same_seed_same_run_different_seed_differs() -> None:
    a = train(TEXT, steps=3, eval_every=0, seed=1, **FAST)
    b = train(TEXT, steps=3, eval_every=0, seed=1, **FAST)
    c = train(TEXT, steps=3, eval_every=0, seed=2, **FAST)
    assert a.losses == b.losses
    assert a.losses != c.losses


def test_context_longer_than_the_model_raises() -> None:
    with pytest.raises(ConfigError, match="context"):
        train(TEXT, steps=2, **{**FAST, "context": 257})  # tiny's context is 256


def test_trainer_rejects_a_context_longer_than_the_model() -> None:
    tok = Tokenizer.train(TEXT, kind="char")
    dataset = TokenDataset.build(Corpus.from_source(TEXT), tok)
    model = create_model("tiny", vocab_size=padded_vocab(tok.vocab_size), n_layer=1, context_length=32)
    with pytest.raises(ConfigError, match="32"):
        Trainer(model, tok, dataset, TrainConfig(context=64), device=torch.device("cpu"))


def test_steps_not_above_the_resumed_step_raise(tmp_path: Path) -> None:
    train(TEXT, steps=4, eval_every=0, out=tmp_path / "run", **FAST)
    options = {k: v for k, v in FAST.items() if k not in ("preset", "tokenizer")}
    for steps in (4, 2):
        with pytest.raises(ConfigError, match="steps"):
            train(TEXT, resume=tmp_path / "run", steps=steps, eval_every=0, **options)


def test_resume_continues_the_step_count(tmp_path: Path) -> None:
    train(TEXT, steps=3, eval_every=0, out=tmp_path / "run", **FAST)
    rec = Recorder()
    options = {k: v for k, v in FAST.items() if k not in ("preset", "tokenizer")}
    result = train(TEXT, resume=tmp_path / "run", steps=5, eval_every=0, listeners=[rec], **options)
    assert rec.of(StartEvent)[0].start_step == 3
    assert [e.step for e in rec.of(StepEvent)] == [4, 5]
    assert result.step == 5
    assert load(tmp_path / "run", with_state=True).step == 5  # resume saves back to the same directory


def test_bf16_without_native_support_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer_module, "autocast_dtype", lambda device: None)
    with pytest.raises(ConfigError, match="bf16"):
        train(TEXT, steps=2, **{**FAST, "precision": "bf16"})


def test_tokenizer_instance_is_used_as_is() -> None:
    tok = Tokenizer.train(["abcdefghijklmnopqrstuvwxyz ,.'"], kind="char")
    result = train(TEXT, steps=1, eval_every=0, **{**FAST, "tokenizer": tok})
    assert result.tokenizer is tok
    assert result.model.config.vocab_size == padded_vocab(tok.vocab_size)


def test_trained_tokenizer_is_cached(forge_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = ["a corpus only this test uses, so its tokenizer file is new. " * 40]
    before = set((forge_cache_dir / "tokenizers").glob("*.json"))
    first = train(text, steps=1, eval_every=0, **FAST)
    assert len(set((forge_cache_dir / "tokenizers").glob("*.json")) - before) == 1

    def no_training(*args: object, **kwargs: object) -> Tokenizer:
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(trainer_module.Tokenizer, "train", no_training)
    second = train(text, steps=1, eval_every=0, **FAST)
    assert second.tokenizer.to_str() == first.tokenizer.to_str()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("batch_size", -1),
        ("grad_accum", 0),
        ("eval_batches", 0),
        ("eval_every", -1),
        ("checkpoint_every", -5),
        ("context", 0),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("grad_clip", 0.0),
        ("weight_decay", -0.1),
        ("precision", "fp16"),
        ("val_fraction", 1.0),
        ("label_smoothing", 1.0),
        ("label_smoothing", -0.1),
    ],
)
def test_train_config_validation(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


def test_train_config_defaults() -> None:
    assert TrainConfig(steps=100).warmup_steps == 10
    assert TrainConfig(steps=5000).warmup_steps == 100
    assert TrainConfig(steps=100, warmup=0).warmup_steps == 0
    schedule = TrainConfig(lr=2e-3, steps=50).schedule_for()
    assert schedule.min_lr == pytest.approx(2e-4)
    assert schedule.total == 50


# -- resuming exactly -----------------------------------------------------------------
RESUME = {"batch_size": 4, "context": 32, "eval_every": 0, "seed": 1234, "device": "cpu"}


def _step_losses(events: list[tuple[int, float]]) -> Callable[[Event], None]:
    def listener(event: Event) -> None:
        if isinstance(event, StepEvent):
            events.append((event.step, event.loss))

    return listener


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_resume_is_equivalent_to_an_uninterrupted_run(hamlet: Path, tmp_path: Path, precision: str) -> None:
    uninterrupted: list[tuple[int, float]] = []
    train(hamlet, preset="tiny", steps=40, precision=precision, listeners=[_step_losses(uninterrupted)], **RESUME)
    assert [s for s, _ in uninterrupted] == list(range(1, 41))

    first_half: list[tuple[int, float]] = []

    def interrupt_at_20(event: Event) -> None:
        if isinstance(event, StepEvent) and event.step == 20:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    interrupted = train(
        hamlet,
        preset="tiny",
        steps=40,
        precision=precision,
        out=out,
        listeners=[_step_losses(first_half), interrupt_at_20],
        **RESUME,
    )
    assert interrupted.interrupted
    assert interrupted.step == 20
    assert load(out, with_state=True).step == 20
    assert first_half == uninterrupted[:20]

    second_half: list[tuple[int, float]] = []
    resumed = train(hamlet, resume=out, steps=40, precision=precision, listeners=[_step_losses(second_half)], **RESUME)
    assert not resumed.interrupted
    assert [s for s, _ in second_half] == list(range(21, 41))
    assert [loss for _, loss in second_half] == pytest.approx([loss for _, loss in uninterrupted[20:]], abs=1e-6)
    assert load(out, with_state=True).step == 40


# -- learning for real ----------------------------------------------------------------
@pytest.mark.slow
def test_tiny_learns_hamlet(hamlet: Path) -> None:
    """200 steps of "tiny" on Hamlet (batch 16, context 128, fp32) lower the validation loss a lot.

    Measured on CPU: step-0 validation loss 7.62 (= ln 2048, a uniform guess), 4.96 after
    200 steps, a drop of 2.66. The test asks for a drop of at least 2.0 and a final loss
    below 5.5: a comfortable margin, yet far from what an untrained or broken model reaches.
    """
    rec = Recorder()
    result = train(
        hamlet,
        preset="tiny",
        steps=200,
        batch_size=16,
        context=128,
        eval_every=100,
        precision="fp32",
        device="cpu",
        listeners=[rec],
    )
    evals = dict(result.evals)
    assert sorted(evals) == [0, 100, 200]
    start, middle, final = evals[0], evals[100], evals[200]
    assert start == pytest.approx(math.log(result.model.config.vocab_size), abs=0.3)
    assert middle < start
    assert final < start - 2.0
    assert final < 5.5
    assert all(math.isfinite(loss) for _, loss in result.losses)


def test_an_out_folder_forge_did_not_write_is_refused_before_training(tmp_path: Path) -> None:
    """`forge train notes --out notes` used to delete the training data when it saved."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text(TEXT[0])
    rec = Recorder()
    with pytest.raises(CheckpointError, match=r"refusing to replace.*choose a new or empty folder"):
        train(notes, steps=2, eval_every=0, out=notes, listeners=[rec], **FAST)
    assert rec.events == []  # refused before any work, not after training
    assert [p.name for p in notes.iterdir()] == ["a.txt"] and (notes / "a.txt").read_text() == TEXT[0]


def test_max_seconds_stops_the_run_on_time(hamlet: Path, tmp_path: Path) -> None:
    """A time budget ends the run at the first step past it (the demo overran its budget sevenfold)."""
    result = train(
        hamlet, preset="tiny", steps=1000, batch_size=2, context=32, eval_every=0, max_seconds=1e-3, out=tmp_path / "r"
    )
    # The clock starts before the first evaluation, which alone takes longer than 1 ms.
    assert result.step == 1 and not result.interrupted
    assert result.evals[-1][0] == 1  # evaluated at the end, as at a last step
    assert load(tmp_path / "r", with_state=True).step == 1


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_max_seconds_is_validated(bad: float) -> None:
    with pytest.raises(ConfigError, match="max_seconds"):
        TrainConfig(max_seconds=bad)


def test_best_weights_copy_and_put_back_only_the_trained_parameters() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[0].requires_grad_(False)  # frozen, as a LoRA run's base weights
    best = BestWeights()
    best.offer(model, step=10, loss=1.0)
    assert best.restore(model, final_loss=1.0) is None  # the last weights are as good: kept
    kept = model[1].weight.detach().clone()
    best.offer(model, step=20, loss=1.5)  # worse: not copied
    with torch.no_grad():
        model[1].weight.add_(1.0)
        model[0].weight.add_(1.0)
    frozen = model[0].weight.detach().clone()
    assert best.restore(model, final_loss=1.5) == (10, 1.0)
    assert torch.equal(model[1].weight, kept) and torch.equal(model[0].weight, frozen)
