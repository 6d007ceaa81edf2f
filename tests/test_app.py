"""The ``Forge`` app: chaining, the issue's example, model management, the sync facade, responsiveness.

Training runs a tiny model for a few steps on the start of Hamlet. Sync/async
parity and responsiveness use an untrained tiny model saved as a checkpoint
(sampling from it gives varied, seed-dependent text); outputs known in advance
come from the "bigram" model of conftest.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import forge
import forge.config
from forge.app import Forge, SyncForge
from forge.config import get_preset, register_preset
from forge.core.quantize import QuantizedWeight
from forge.errors import CheckpointError, ConfigError, ForgeError, PresetNotFoundError
from forge.events import Event, StartEvent, StepEvent
from forge.generator import GenerationConfig
from forge.middleware import Context, Next, logger, timer
from forge.models import create_model, padded_vocab, save
from forge.tokenizer import Tokenizer

#: Small and quick: short windows, a cheap evaluation.
FAST: dict[str, Any] = {"batch_size": 2, "context": 16, "eval_batches": 2, "precision": "fp32"}
SAMPLED: dict[str, Any] = {"temperature": 1.0, "seed": 3, "max_tokens": 30}


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory: pytest.TempPathFactory, char_tokenizer: Tokenizer) -> Path:
    """An untrained tiny model with a char tokenizer: ~0.5 ms a token on a CPU, varied sampled text."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("random") / "checkpoint"
    save(path, create_model("tiny", vocab_size=padded_vocab(char_tokenizer.vocab_size)), char_tokenizer)
    return path


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory, notes: Path) -> Path:
    """A checkpoint written by ``app.save`` after 3 steps of training."""
    path = tmp_path_factory.mktemp("trained") / "checkpoint"
    app = Forge(model="tiny", tokenizer="char")
    asyncio.run(app.train(notes, steps=3, **FAST))
    assert app.save(path) is app
    return path


@pytest.fixture
def preset_name() -> Iterator[str]:
    """A preset name that is free during the test and removed from the registry afterwards."""
    name = "forge-test-nano"
    assert name not in forge.config.PRESETS
    yield name
    forge.config.PRESETS.pop(name, None)


def greedy(app: Forge, prompt: str = "to be", max_tokens: int = 20) -> str:
    result = app.sync.generate(prompt, max_tokens=max_tokens, temperature=0)
    assert isinstance(result, str)
    return result


# -- chaining ------------------------------------------------------------------------------
def test_configuring_methods_return_the_app() -> None:
    app = Forge(model="tiny", tokenizer="char")

    def listener(event: Event) -> None:
        pass

    assert app.use(timer()) is app
    assert app.on("step", listener) is app
    assert app.once("end", listener) is app
    assert app.off("step", listener) is app
    assert app.off("end") is app
    assert app.emit(StepEvent(1, 1, 1.0, 1e-3, 1.0, 1.0, 1.0, 0.0)) is app
    assert app.on_error(lambda ctx, error: None) is app


def test_a_chain_configures_the_app() -> None:
    async def custom(ctx: Context, next: Next) -> None:
        await next()

    app = (
        Forge(model="tiny").use(logger()).use(timer()).use(custom).on("step", print).on("step", repr).once("end", print)
    )
    info = app.info()
    assert info["middleware"] == ["logger_mw", "timer_mw", "custom"]
    assert info["listeners"] == {"step": 2, "end": 1}


def test_the_package_exports_the_app_api() -> None:
    assert forge.Forge is Forge
    assert forge.SyncForge is SyncForge
    assert forge.logger is logger
    assert forge.timer is timer
    for name in ("cache", "rate_limit", "content_filter", "prompt_template", "error_handler", "register_preset"):
        assert name in forge.__all__
        assert callable(getattr(forge, name))


# -- the example from the issue, as written ----------------------------------------------------
@pytest.fixture
def in_notes_dir(tmp_path: Path, hamlet_text: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current directory holds notes.txt, as in the issue's example."""
    (tmp_path / "notes.txt").write_text(hamlet_text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _check_example_output(here: Path, out: str, text: object, pieces: list[str], caplog: Any) -> None:
    steps = [line.split() for line in out.splitlines()]
    assert [int(s) for s, _ in steps] == list(range(1, 21))
    assert all(float(loss) > 0 for _, loss in steps)
    assert isinstance(text, str)
    assert all(isinstance(p, str) and p for p in pieces)
    log_lines = [r.getMessage() for r in caplog.records if r.name == "forge" and r.levelno == logging.INFO]
    assert [line.split()[1:3] for line in log_lines] == [["generate", "'Once"], ["stream", "'Once"]]
    assert Forge.load(here / "out").info()["step"] == 20


def test_the_issue_example_runs(in_notes_dir: Path, capsys: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="forge")

    async def main() -> tuple[str, list[str]]:
        app = Forge(model="tiny").use(logger()).use(timer()).on("step", lambda e: print(e.step, e.loss))
        await app.train("notes.txt", steps=20, batch_size=2, context=32)
        text = await app.generate("Once upon a time", max_tokens=50)
        pieces = [piece async for piece in app.stream("Once upon a time")]
        app.save("out/")
        return text, pieces  # type: ignore[return-value]

    text, pieces = asyncio.run(main())
    _check_example_output(in_notes_dir, capsys.readouterr().out, text, pieces, caplog)


def test_the_issue_example_sync_twin(in_notes_dir: Path, capsys: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="forge")
    app = Forge(model="tiny").use(logger()).use(timer()).on("step", lambda e: print(e.step, e.loss))
    app.sync.train("notes.txt", steps=20, batch_size=2, context=32)
    text = app.sync.generate("Once upon a time", max_tokens=50)
    pieces = list(app.sync.stream("Once upon a time"))
    app.save("out/")
    _check_example_output(in_notes_dir, capsys.readouterr().out, text, pieces, caplog)


# -- model management -------------------------------------------------------------------------------
def test_unknown_preset_suggests_close_names() -> None:
    with pytest.raises(PresetNotFoundError, match="did you mean 'tiny'"):
        Forge("tinyy")


def test_a_preset_name_wins_over_a_same_named_directory(
    bigram_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    shutil.copytree(bigram_dir, tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    assert Forge("tiny").info()["trained"] is False  # the preset
    assert Forge("./tiny").info()["trained"] is True  # the directory
    assert Forge.load("tiny").info()["trained"] is True


def test_a_path_that_is_not_a_directory_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="some/missing/dir"):
        Forge("some/missing/dir")
    with pytest.raises(CheckpointError, match="nope"):
        Forge.load(tmp_path / "nope")


def test_a_missing_path_object_is_a_checkpoint_error_not_a_preset(tmp_path: Path) -> None:
    """A ``pathlib.Path`` is never a preset name; ``Forge(model=...)`` accepts ``os.PathLike``."""
    with pytest.raises(CheckpointError, match="nope"):
        Forge(tmp_path / "nope")


def test_an_empty_directory_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        Forge(tmp_path)


def test_an_untrained_preset_app_says_to_train_first() -> None:
    app = Forge(model="tiny", tokenizer="char")
    with pytest.raises(ForgeError, match=r"not been trained.*app\.train"):
        asyncio.run(app.generate("hello"))
    with pytest.raises(ForgeError, match="not been trained"):
        list(app.sync.stream("hello"))
    with pytest.raises(ForgeError, match=r"app\.save\(\) needs a trained model"):
        app.save("out")


def test_info_before_training() -> None:
    info = Forge(model="tiny", tokenizer="char").info()
    assert info["model"] == "tiny"
    assert info["trained"] is False
    assert info["parameters"] is None
    assert info["step"] == 0
    assert info["family"] == "gpt2"
    assert info["config"] == get_preset("tiny").to_dict()
    assert (info["middleware"], info["listeners"], info["stack_built"]) == ([], {}, False)


def test_train_builds_the_model_and_info_reports_it(notes: Path) -> None:
    app = Forge(model="tiny", tokenizer="char").on("step", print).on("error", print)
    result = asyncio.run(app.train(notes, steps=3, **FAST))
    assert result.step == 3
    assert app.model is result.model and app.tokenizer is result.tokenizer
    info = app.info()
    assert info["trained"] is True
    assert info["step"] == 3
    assert info["parameters"] == result.model.num_params() > 0
    assert info["tokenizer_vocab"] == result.tokenizer.vocab_size
    assert info["config"]["n_layer"] == get_preset("tiny").n_layer
    assert info["listeners"] == {"step": 1, "error": 1}


def test_train_again_continues_the_run(notes: Path) -> None:
    app = Forge(model="tiny", tokenizer="char")
    asyncio.run(app.train(notes, steps=3, **FAST))
    starts: list[StartEvent] = []
    steps: list[int] = []
    app.on("start", starts.append).on("step", lambda e: steps.append(e.step))
    result = asyncio.run(app.train(notes, steps=5, **FAST))  # steps counts in total: two more
    assert result.step == 5
    assert [(s.start_step, s.total_steps) for s in starts] == [(3, 5)]
    assert steps == [4, 5]
    assert app.info()["step"] == 5


@pytest.mark.parametrize("steps", [0, -1, True, 2.5])
def test_train_needs_a_positive_step_count(notes: Path, steps: object) -> None:
    app = Forge(model="tiny", tokenizer="char")
    with pytest.raises(ConfigError, match="steps"):
        asyncio.run(app.train(notes, steps=steps, **FAST))  # type: ignore[arg-type]


def test_train_rejects_unknown_options(notes: Path) -> None:
    app = Forge(model="tiny", tokenizer="char")
    with pytest.raises(ConfigError, match="batchsize"):
        asyncio.run(app.train(notes, steps=2, batchsize=2))


def test_save_then_load_gives_the_same_model(trained_dir: Path, tmp_path: Path) -> None:
    app = Forge.load(trained_dir)
    assert app.save(tmp_path / "copy") is app
    again = Forge.load(tmp_path / "copy")
    assert greedy(again) == greedy(app) == greedy(Forge(trained_dir))
    assert again.info()["step"] == app.info()["step"] == 3
    assert again.info()["parameters"] == app.info()["parameters"]
    assert again.info()["trained"] is True


def test_training_after_load_continues_the_step_count(trained_dir: Path, notes: Path, tmp_path: Path) -> None:
    app = Forge.load(trained_dir)
    starts: list[StartEvent] = []
    app.on("start", starts.append)
    result = asyncio.run(app.train(notes, steps=5, out=tmp_path / "more", **FAST))  # in total: two more
    assert result.step == 5
    assert starts[0].start_step == 3
    assert app.info()["step"] == 5
    assert Forge.load(tmp_path / "more").info()["step"] == 5


def test_load_passes_options_to_the_app(bigram_dir: Path) -> None:
    app = Forge.load(bigram_dir, defaults=GenerationConfig(temperature=0, max_tokens=3), device="cpu")
    assert app.sync.generate("a") == "bcd"
    assert app.info()["device"] == "cpu"


def test_register_preset_makes_a_name_usable(preset_name: str, notes: Path) -> None:
    nano = get_preset("tiny").replace(n_layer=1, d_model=32, n_head=2)
    register_preset(preset_name, nano)
    app = Forge(preset_name, tokenizer="char")
    assert app.info()["config"] == nano.to_dict()
    asyncio.run(app.train(notes, steps=2, **FAST))
    assert app.model is not None
    assert (app.model.config.n_layer, app.model.config.d_model) == (1, 32)


def test_register_preset_refuses_to_overwrite(preset_name: str) -> None:
    first = get_preset("tiny").replace(n_layer=1)
    second = get_preset("tiny").replace(n_layer=2)
    register_preset(preset_name, first)
    with pytest.raises(ConfigError, match="overwrite=True"):
        register_preset(preset_name, second)
    assert get_preset(preset_name) == first
    register_preset(preset_name, second, overwrite=True)
    assert Forge(preset_name).info()["config"]["n_layer"] == 2


def test_register_preset_needs_a_model_config(preset_name: str) -> None:
    with pytest.raises(ConfigError, match="ModelConfig"):
        register_preset(preset_name, {"n_layer": 1})  # type: ignore[arg-type]
    assert preset_name not in forge.config.PRESETS


def test_an_unknown_generation_option_is_a_config_error(bigram_dir: Path) -> None:
    """Like ``app.train``, a misspelt option names itself (a server passes user JSON straight in)."""
    app = Forge.load(bigram_dir)
    with pytest.raises(ConfigError, match="max_tokenz"):
        app.sync.generate("a", max_tokenz=5)
    with pytest.raises(ConfigError, match="temprature"):
        list(app.sync.stream("a", temprature=0))


def test_an_invalid_generation_option_is_a_config_error(bigram_dir: Path) -> None:
    app = Forge.load(bigram_dir)
    with pytest.raises(ConfigError, match="max_tokens"):
        app.sync.generate("a", max_tokens=0)


def test_a_prompt_must_be_a_string(bigram_dir: Path) -> None:
    app = Forge.load(bigram_dir)
    with pytest.raises(ConfigError, match="prompt"):
        list(app.sync.stream(42))  # type: ignore[arg-type]


# -- async / sync parity ------------------------------------------------------------------------------
def test_sync_generate_equals_async_generate(random_dir: Path) -> None:
    app = Forge.load(random_dir)
    async_text = asyncio.run(app.generate("to be", **SAMPLED))
    assert app.sync.generate("to be", **SAMPLED) == async_text
    assert app.sync.generate("to be", **{**SAMPLED, "seed": 4}) != async_text  # the seed matters


def test_sync_stream_equals_async_stream(random_dir: Path) -> None:
    app = Forge.load(random_dir)

    async def collect() -> list[str]:
        return [piece async for piece in app.stream("to be", **SAMPLED)]

    pieces = asyncio.run(collect())
    assert list(app.sync.stream("to be", **SAMPLED)) == pieces
    assert "".join(pieces) == app.sync.generate("to be", **SAMPLED)


def test_sync_stream_left_early_can_be_followed_by_more_requests(bigram_dir: Path) -> None:
    app = Forge.load(bigram_dir, defaults=GenerationConfig(temperature=0, max_tokens=6))
    for piece in app.sync.stream("a"):
        assert piece == "b"
        break
    assert app.sync.generate("a") == "bcdefg"


def test_sync_generate_from_a_thread_while_a_loop_runs(random_dir: Path) -> None:
    app = Forge.load(random_dir)
    expected = app.sync.generate("to be", **SAMPLED)

    async def main() -> str:
        return await asyncio.to_thread(app.sync.generate, "to be", **SAMPLED)  # type: ignore[return-value]

    assert asyncio.run(main()) == expected


def test_sync_train_continues_like_async(notes: Path) -> None:
    app = Forge(model="tiny", tokenizer="char")
    app.sync.train(notes, steps=2, **FAST)
    result = app.sync.train(notes, steps=3, **FAST)  # in total: one more
    assert result.step == 3
    assert app.info()["step"] == 3


def test_sync_generate_list_of_prompts(bigram_dir: Path) -> None:
    app = Forge.load(bigram_dir, defaults=GenerationConfig(temperature=0, max_tokens=3))
    assert app.sync.generate(["a", "c", "e"]) == ["bcd", "def", "fgh"]


# -- the event loop stays responsive --------------------------------------------------------------------
class LoopWatch:
    """Whether the event loop runs while work is under way in another thread, with no ticks counted or sleeps.

    :meth:`check` is called from inside the work (a training step's listener, the model's forward): it asks
    the loop to set a flag and waits for it. Work run on the loop's own thread blocks the loop, so the flag is
    never set there and the wait ends at its timeout, which only guards against a deadlock.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.answers: list[bool] = []

    def check(self, *_: object) -> None:
        if self.answers:  # once per run is enough
            return
        assert self.loop is not None
        answered = threading.Event()
        self.loop.call_soon_threadsafe(answered.set)
        self.answers.append(answered.wait(timeout=60))

    async def around(self, work: Callable[[], Awaitable[object]]) -> list[bool]:
        self.loop = asyncio.get_running_loop()
        await work()
        return self.answers


def test_the_loop_runs_during_training(notes: Path) -> None:
    watch = LoopWatch()
    app = Forge(model="tiny", tokenizer="char").once("step", watch.check)
    assert asyncio.run(watch.around(lambda: app.train(notes, steps=2, **FAST))) == [True]


def test_the_loop_runs_during_generate(random_dir: Path) -> None:
    watch = LoopWatch()
    app = Forge.load(random_dir)
    assert app.model is not None
    app.model.register_forward_pre_hook(watch.check)
    run = watch.around(lambda: app.generate("to be", max_tokens=8, stop_at_eos=False, seed=0))
    assert asyncio.run(run) == [True]


def test_the_loop_runs_during_a_stream(random_dir: Path) -> None:
    watch = LoopWatch()
    app = Forge.load(random_dir)
    assert app.model is not None
    app.model.register_forward_pre_hook(watch.check)

    async def consume() -> None:
        async for _ in app.stream("to be", max_tokens=8, stop_at_eos=False, seed=0):
            pass

    assert asyncio.run(watch.around(consume)) == [True]


def test_other_requests_are_served_during_training(notes: Path, bigram_dir: Path) -> None:
    """While one app trains in a worker, the same loop serves another app's requests: the training thread
    waits, inside its first step's listener, until the other app has answered."""
    trainer = Forge(model="tiny", tokenizer="char")
    server = Forge.load(bigram_dir, defaults=GenerationConfig(temperature=0, max_tokens=4))
    answered = threading.Event()
    held: list[bool] = []

    async def main() -> object:
        loop = asyncio.get_running_loop()
        training = asyncio.Event()

        def hold(event: Event) -> None:  # runs in the training thread, mid-run
            loop.call_soon_threadsafe(training.set)
            held.append(answered.wait(timeout=60))  # the timeout only guards against a deadlock

        trainer.once("step", hold)
        task = asyncio.create_task(trainer.train(notes, steps=2, **FAST))
        await training.wait()
        answer = await server.generate("a")
        answered.set()
        await task
        return answer

    assert asyncio.run(main()) == "bcde"
    assert held == [True]  # training was still under way when the answer came


def test_an_inference_dtype_casts_the_weights_and_refuses_training(bigram_dir: Path, notes: Path) -> None:
    app = Forge.load(bigram_dir, dtype="bfloat16", defaults=GenerationConfig(temperature=0, max_tokens=4))
    assert app.info()["dtype"] == "bfloat16"
    assert app.sync.generate("a") == "bcde"
    with pytest.raises(ConfigError, match="float32 master weights"):
        app.sync.train(notes, steps=1)
    assert Forge.load(bigram_dir).info()["dtype"] == "float32"
    assert Forge.load(bigram_dir, dtype="auto").info()["dtype"] in ("float32", "bfloat16")


def test_float16_is_not_an_inference_dtype(bigram_dir: Path) -> None:
    with pytest.raises(ConfigError, match="float16"):
        Forge.load(bigram_dir, dtype="float16")  # type: ignore[arg-type]


# -- quantized inference (issue 17) ----------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_load_quantized_keeps_embeddings_and_head_float(random_dir: Path, scheme: str) -> None:
    plain, app = Forge.load(random_dir), Forge.load(random_dir, quantize=scheme)  # type: ignore[arg-type]
    assert app.model is not None
    quantized = [m for m in app.model.modules() if isinstance(m, QuantizedWeight)]
    assert len(quantized) == 4 * 4  # tiny: 4 blocks of qkv, attention out, MLP up and down
    assert app.model.tok_emb.weight.dtype == torch.float32 and app.model.lm_head.weight is app.model.tok_emb.weight
    info, before = app.info(), plain.info()
    assert info["quantize"] == scheme and before["quantize"] is None
    assert info["parameters"] == before["parameters"]  # a quantized weight still counts its values
    linear = sum(m.shape.numel() for m in quantized)
    assert before["weight_bytes"] - info["weight_bytes"] > linear * 4 // 2  # fp32 linears at least halved
    assert app.sync.generate("to be", max_tokens=5, temperature=0)  # ops.linear runs the quantized weights


def test_load_quantize_refuses_an_unknown_scheme_before_loading(random_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"Forge\.quantize = 'int3' is invalid: use one of int8, int4") as caught:
        Forge.load(random_dir, quantize="int3")  # type: ignore[arg-type]
    assert caught.value.field == "quantize"


def test_load_quantized_app_refuses_to_train(random_dir: Path, notes: Path) -> None:
    app = Forge.load(random_dir, quantize="int8")
    with pytest.raises(ConfigError, match=r"quantize='int8'.*create the app without quantize"):
        app.sync.train(notes, steps=1, **FAST)
