"""Training for a wall-clock budget (``--time``), and the ``auto`` preset that sizes the model for it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tests.helpers import run_cli

from forge.budget import TimePlan, auto_pick, format_duration, parse_duration
from forge.core.checkpoint import read_training_state
from forge.errors import ConfigError
from forge.events import Event, StepEvent
from forge.models import load
from forge.trainer import DEFAULT_STEPS, TrainConfig, train

TEXT = ["to be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 40]
#: A tiny model and batch: many steps fit in a second or two, even on a busy CPU.
FAST = dict(preset="tiny", tokenizer="char", batch_size=2, context=16, eval_every=0, eval_batches=1)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """A tiny model's steps on one thread: on a CPU shared with other work, two threads stall every op 50-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("2m", 120), ("1h", 3600), ("1m30s", 90), ("1.5h", 5400), ("500ms", 0.5), (" 45 ", 45), (7, 7)],
)
def test_durations_parse(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["2x", "", "m", "1m1m", "-1s", "0s", "s30", True, float("inf")])
def test_a_bad_duration_names_the_value_and_the_fix(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"is not a (positive )?duration; write a duration such as 90s") as e:
        parse_duration(bad)  # type: ignore[arg-type]
    assert repr(bad) in str(e.value)


def test_format_duration_reads_back() -> None:
    for seconds in (5, 90, 3600, 3725):
        assert parse_duration(format_duration(seconds)) == seconds


def test_train_config_takes_a_budget_one_way() -> None:
    assert TrainConfig(time="2m").budget == 120 and TrainConfig(max_seconds=30).budget == 30
    assert TrainConfig().total_steps == DEFAULT_STEPS and TrainConfig(time="2m").total_steps is None
    with pytest.raises(ConfigError, match="time='ten minutes' is not a duration"):
        TrainConfig(time="ten minutes")
    with pytest.raises(ConfigError, match="both set the time budget; pass one"):
        TrainConfig(time="2m", max_seconds=10)


def test_the_plan_fits_steps_evaluations_and_the_reserve_into_the_time_left() -> None:
    plan = TimePlan(budget=100.0, start_step=0, reserve=10.0, eval_cost=2.0, eval_every=10)
    assert plan.total(step=0, elapsed=0.0) == 1  # nothing timed yet: one step, then a plan
    plan.observe(5.0)  # the first step warms up: it stands in only until the second
    plan.observe(0.8)
    assert plan.step_time == 0.8
    assert plan.total(step=2, elapsed=10.0) == 2 + int(80 / (0.8 + 0.2))
    plan.observe(1.8)  # slower now: the plan shrinks
    assert plan.total(step=3, elapsed=11.0) < 2 + int(80 / (0.8 + 0.2))
    assert TimePlan(budget=100, start_step=0, cap=5, step_time=0.1).total(step=1, elapsed=1) == 5
    assert TimePlan(budget=1, start_step=4, step_time=9.0).total(step=5, elapsed=3) == 5  # out of time: stop
    early = TimePlan(budget=10, start_step=0, reserve=9.5)
    early.observe(1.0)  # only the warm-up step timed: a second step, to measure
    assert early.total(step=1, elapsed=1.0) == 2


def _steps(events: list[Event]) -> list[StepEvent]:
    return [e for e in events if isinstance(e, StepEvent)]


def test_a_time_budget_ends_on_time_with_the_schedule_warmed_down(tmp_path: Path) -> None:
    events: list[Event] = []
    result = train(TEXT, time="3s", out=tmp_path / "run", listeners=[events.append], schedule="linear", **FAST)
    steps = _steps(events)
    assert result.step == steps[-1].step == steps[-1].total_steps > 1  # the last step is the one planned last
    # The schedule was planned against the budget, not a step count: the last step is at its warm-down's end.
    # Near it, not on it: a step slower than the plan's average ends the run a few steps before the plan
    # that set that step's rate (on a busy machine ~30 steps fit in the budget, and each step the plan
    # missed is ~3% of the way), whereas a 300-step plan would leave it at 0.8 of the way down.
    planned = TrainConfig(lr=1e-3, schedule="linear").schedule_for(result.step)
    assert planned(result.step - 1) == min(planned(s) for s in range(planned.warmup, result.step))
    floor, peak = planned(result.step - 1), 1e-3
    assert floor <= steps[-1].lr <= floor + 0.15 * (peak - floor)
    assert max(s.lr for s in steps) > floor + 0.5 * (peak - floor)  # it did warm up first
    # A behaviour bound, not a speed figure: ends at the budget, plus generous slack for a busy machine.
    assert result.timing["budget"] == 3.0 and result.timing["total"] is not None and result.timing["total"] < 3 + 8
    assert result.evals[-1][0] == result.step and load(tmp_path / "run", with_state=True).step == result.step


def test_steps_and_time_end_at_whichever_comes_first() -> None:
    events: list[Event] = []
    result = train(TEXT, time="1m", steps=4, listeners=[events.append], **FAST)
    assert result.step == 4 and _steps(events)[-1].total_steps == 4


def test_a_resumed_time_budget_trains_on_for_a_fresh_budget(tmp_path: Path) -> None:
    first = train(TEXT, time="1s", out=tmp_path / "run", **FAST)
    again = train(TEXT, resume=tmp_path / "run", time="1s", **{k: v for k, v in FAST.items() if k != "tokenizer"})
    assert again.step > first.step


def test_auto_grows_the_model_with_the_budget_and_the_data() -> None:
    small = auto_pick(budget=30, corpus_bytes=100_000, device="cpu")
    big = auto_pick(budget=8 * 3600, corpus_bytes=500_000_000, device="cpu")
    assert small.config.n_layer * small.config.d_model < big.config.n_layer * big.config.d_model
    assert small.vocab_size < big.vocab_size
    starved = auto_pick(budget=8 * 3600, corpus_bytes=100_000, device="cpu")  # a big budget, little text
    assert starved.config.d_model < big.config.d_model
    assert "auto preset:" in small.reason and "30s budget" in small.reason


def test_auto_on_a_gpu_grows_the_model_as_far_as_the_data_allows() -> None:
    cpu = auto_pick(budget=600, corpus_bytes=5_100_000, device="cpu")
    gpu = auto_pick(budget=600, corpus_bytes=5_100_000, device="cuda")
    hidden = 12 * gpu.config.d_model**2 * gpu.config.n_layer
    # The GPU's compute buys a bigger model than the CPU's, up to about 2 hidden parameters per byte of text.
    assert gpu.config.d_model * gpu.config.n_layer > cpu.config.d_model * cpu.config.n_layer
    assert 1_000_000 < hidden <= 2 * 5_100_000
    assert "the most this much text supports" in gpu.reason
    more_text = auto_pick(budget=600, corpus_bytes=500_000_000, device="cuda")
    assert more_text.config.d_model > gpu.config.d_model
    assert "supports" not in more_text.reason
    # Label smoothing was measured on the CPU's small shapes only; the bigger ones train without.
    assert auto_pick(budget=120, corpus_bytes=5_100_000, device="cpu").label_smoothing == 0.05
    assert cpu.label_smoothing == gpu.label_smoothing == 0.0


def test_auto_trains_a_new_model_llama_style_with_muon_at_its_measured_lr() -> None:
    quick = dict(steps=1, tokenizer="char", batch_size=2, context=16, eval_every=0, eval_batches=1)
    result = train(TEXT, preset="auto", **quick)
    pick = auto_pick(budget=120, corpus_bytes=len(TEXT[0]), device="cpu")
    config = result.state["train_config"]  # type: ignore[index]
    assert (config["lr"], config["optimizer"]) == (pick.lr, "muon") and pick.lr != TrainConfig().lr
    assert config["label_smoothing"] == pick.label_smoothing == 0.05 != TrainConfig().label_smoothing
    assert result.model.config.family == "llama" and result.model.config.norm == "rmsnorm"
    # What the call chose stays as it chose it.
    options = dict(lr=5e-4, optimizer="adamw", label_smoothing=0.0)
    chosen = train(TEXT, preset="auto", **options, **quick).state["train_config"]  # type: ignore[index]
    assert (chosen["lr"], chosen["optimizer"], chosen["label_smoothing"]) == (5e-4, "adamw", 0.0)


def test_forge_train_time_auto_says_what_it_picked_and_how_the_time_went(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "notes.txt"
    data.write_text(TEXT[0])
    args = ["train", data, "--time", "2s", "--tokenizer", "char", "--batch-size", "2", "--context", "16"]
    code, out, err = run_cli([*args, "--eval-batches", "1", "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    out = " ".join(out.split())  # as one line, however the console wrapped it
    assert "auto preset:" in out and "for a 2s budget on cpu" in out
    assert "time budget 2s:" in out and "reading the data" in out
    _, info, _ = run_cli(["info", tmp_path / "run", "--json"], capsys)
    assert json.loads(info)["step"] >= 1
    # No --lr: the auto shape's measured learning rate.
    saved = read_training_state(tmp_path / "run")
    assert saved is not None
    pick = auto_pick(budget=2, corpus_bytes=len(TEXT[0]), device="cpu")
    assert (saved["train_config"]["lr"], saved["train_config"]["label_smoothing"]) == (pick.lr, pick.label_smoothing)
    # Flags given win over the measured values, 0 included.
    code, _, err = run_cli(
        [*args, "--steps", "1", "--lr", "5e-4", "--label-smoothing", "0", "--out", tmp_path / "r2"], capsys
    )
    chosen = read_training_state(tmp_path / "r2")
    assert code == 0 and chosen is not None, err
    assert (chosen["train_config"]["lr"], chosen["train_config"]["label_smoothing"]) == (5e-4, 0.0)
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("whether to take arms against a sea of troubles, and by opposing end them.")
    code, scored, err = run_cli(["eval", tmp_path / "run", held_out, "--json"], capsys)  # the fresh checkpoint
    assert code == 0, err
    result = json.loads(scored)
    assert 0 < result["bytes"] <= len(held_out.read_bytes()) and 0 < result["bits_per_byte"] < 16


def test_forge_train_refuses_a_bad_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "notes.txt"
    data.write_text(TEXT[0])
    code, _, err = run_cli(["train", data, "--time", "soon"], capsys)
    assert code != 0 and "--time soon is not a duration" in err and "90s" in err and "Traceback" not in err
