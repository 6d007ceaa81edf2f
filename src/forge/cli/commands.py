"""``forge train``, ``forge generate``, ``forge info`` and ``forge demo``."""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

from forge import models
from forge.budget import format_duration
from forge.cli.options import (
    COMPILE_OPTION,
    DEVICE_OPTION,
    DRAFT_OPTION,
    POSITIVE_FLOAT,
    QUANTIZE_OPTION,
    AliasedOption,
    ForgeGroup,
    field_option,
    field_options,
    speculate_with,
)
from forge.cli.progress import TrainingDisplay
from forge.config import preset_names
from forge.core.checkpoint import read_training_state
from forge.core.device import resolve_device
from forge.core.distributed import World
from forge.core.quantize import quantize_model
from forge.data import stdlib_corpus
from forge.distributed import DistributedConfig, RunSpec, last_checkpoint_step, launch, logs_dir, run_worker
from forge.draft import load_draft
from forge.errors import ConfigError, DataError, ForgeError
from forge.generator import GenerationConfig, Generator
from forge.runs import MEASURED
from forge.trainer import TrainConfig, TrainResult, auto_preset, train

__all__ = ["GENERATION_FLAGS", "TRAIN_FLAGS", "cli"]

#: TrainConfig's fields that are flags of `forge train`: every one.
TRAIN_FLAGS = tuple(f.name for f in dataclasses.fields(TrainConfig))
#: DistributedConfig's fields: the flags of `forge train` that spread it over processes and nodes.
DISTRIBUTED_FLAGS = tuple(f.name for f in dataclasses.fields(DistributedConfig))
#: GenerationConfig's fields that are flags of `forge generate` and `forge chat` (stop is repeatable, below).
GENERATION_FLAGS = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "speculate",
)


@click.group(cls=ForgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="forge-llm", prog_name="forge")
def cli() -> None:
    """Forge: train a language model on your text, then generate from it."""


def _console() -> Console:
    return Console(highlight=False)


@cli.command("train")
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "--preset",
    default="auto",
    show_default=True,
    help=f"Model preset: auto (a shape for the time budget, the device and the data), {', '.join(preset_names())}.",
)
@click.option(
    "--model",
    "model",
    cls=AliasedOption,
    aliases=("--from",),  # its old name, kept for scripts
    default=None,
    help="Fine-tune this pretrained model (GGUF file, HF folder, Forge checkpoint or known name) instead of a preset.",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Checkpoint directory [default: runs/PRESET]."
)
@click.option("--resume", type=click.Path(path_type=Path), default=None, help="Continue from this checkpoint.")
@DEVICE_OPTION
@click.option("--tokenizer", type=click.Choice(["bpe", "char"]), default="bpe", show_default=True)
@click.option("--vocab-size", type=click.IntRange(min=2), default=None, help="BPE vocabulary [default: the preset's].")
@field_options(
    TrainConfig,
    TRAIN_FLAGS,
    lora_rank={"aliases": ("--lora",)},
    compile={"help": "torch.compile the training step [default: on for CUDA; on a CPU for a --time of 90 s or more]."},
    optimizer={
        "default": None,
        "help": "adamw or muon [default: muon for a new model (not under --strategy fsdp), adamw to fine-tune; "
        "a resumed run keeps its own].",
    },
    label_smoothing={
        "help": "Share of each target's mass spread over the vocabulary in the training loss [default: 0.05 for "
        "a new model of the auto preset's small (CPU) shapes, where it was measured; else 0]."
    },
)
@field_options(DistributedConfig, DISTRIBUTED_FLAGS)
def train_cmd(
    data: Path,
    preset: str,
    model: str | None,
    out: Path | None,
    resume: Path | None,
    device: str,
    tokenizer: str,
    vocab_size: int | None,
    **options: Any,
) -> None:
    """Train a model on DATA: a text file or a folder of .txt/.md files.

    With --model, fine-tune a pretrained model (all weights, or LoRA adapters with --lora-rank RANK, merged
    when saved).
    """
    console = _console()
    resolve_device(device)  # fail before any work if the device is unavailable
    if model is not None and resume is not None:
        raise ConfigError("--model and --resume both name a starting point; pass one of them")
    if options["lora_rank"] and model is None and resume is None:
        raise ConfigError("--lora-rank adapts a pretrained model; add --model MODEL")
    pretrained = models.load(model) if model is not None else None
    if resume is None and pretrained is None and preset != "auto":
        models.get_preset(preset)  # an unknown preset fails before reading data
    if pretrained is not None and options["context"] is None:  # a pretrained context (e.g. 8192) is too long
        options["context"] = min(512, pretrained.model.config.context_length)
    out = out or resume or Path("runs") / (Path(model).stem if model else preset)
    dist_config = DistributedConfig(**{k: options.pop(k) for k in DISTRIBUTED_FLAGS})
    if options["optimizer"] is None:
        options["optimizer"] = default_optimizer(resume, model, dist_config.strategy)
    config, pick = TrainConfig(**options), None
    if preset == "auto" and resume is None and model is None:  # picked here, once, for every rank
        # A new model of the auto shape trains with the options measured for it (lr, optimizer, smoothing), unless
        # flags say otherwise: a flag's default is no choice.
        ctx = click.get_current_context()
        given = {k for k in MEASURED if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
        chosen = {k: v for k, v in options.items() if k not in MEASURED or k in given}
        config, pick = auto_preset(data, config, str(resolve_device(device)), tokenizer=tokenizer, chosen=chosen)  # type: ignore[arg-type]
    if dist_config.launches or World.from_env() is not None:
        shape = preset
        if pick is not None:
            shape, vocab_size = pick.config, vocab_size or pick.vocab_size  # type: ignore[assignment]
            console.print(pick.reason)
        spec = RunSpec(
            data=str(data),
            config=config,
            out=str(out),
            preset=shape,  # type: ignore[arg-type]
            resume=str(resume) if resume is not None else None,
            model=model,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            device=device,
            strategy=dist_config.strategy,
        )
        _train_distributed(console, spec, dist_config, data)
        return
    result = train(
        data,
        model=pretrained.model if pretrained else None,
        preset=preset,
        out=out,
        resume=resume,
        tokenizer=pretrained.tokenizer if pretrained else tokenizer,  # type: ignore[arg-type]
        vocab_size=vocab_size,
        device=device,
        config=config,
        listeners=[TrainingDisplay(console)],
        announce=console.print,
    )
    if result.interrupted:
        _interrupted(result, data, TrainConfig(**options))
    _summary(console, result)


def _train_worker(spec: RunSpec) -> dict[str, Any]:
    """One rank of `forge train --nproc N` (or of `torchrun -m forge train`): rank 0 shows the progress."""
    console = _console()
    try:
        return run_worker(spec, listeners=[TrainingDisplay(console)], announce=console.print)
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # the launcher says what happened, once
    except ForgeError as e:  # in a spawned worker no CLI prints it: one line (in rank N's log for N > 0)
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {e.message}", markup=False)
        raise SystemExit(e.exit_code) from None


def _train_distributed(console: Console, spec: RunSpec, dist_config: DistributedConfig, data: Path) -> None:
    """Run the workers here (torchrun started this process) or launch them; then the summary."""
    if World.from_env() is not None:  # a torchrun worker already: train as one rank
        summary = _train_worker(spec)
    else:
        if not data.exists():
            raise DataError(f"data path {str(data)!r} does not exist; pass a text file or a folder of .txt/.md files")
        try:
            summary = launch(_train_worker, (spec,), dist_config, out=spec.out)[0]
        except KeyboardInterrupt:
            step = last_checkpoint_step(Path(spec.out))
            where = f"the last checkpoint (step {step}) is intact in {spec.out}" if step else "no checkpoint was saved"
            Console(stderr=True, highlight=False, soft_wrap=True).print(
                f"interrupted; {where}; resume with --resume {shlex.quote(spec.out)} {_go_on(spec.config)}",
                markup=False,
            )
            raise SystemExit(130) from None
        if dist_config.nproc and dist_config.nproc > 1:
            console.print(f"output of the ranks other than 0: {logs_dir(spec.out)}")
    if summary["evals"]:
        (s0, v0), (s1, v1) = summary["evals"][0], summary["evals"][-1]
        console.print(f"val loss {v0:.4f} (step {s0}) -> {v1:.4f} (step {s1})")
    if summary["checkpoint"]:
        console.print(
            f"saved to [bold]{summary['checkpoint']}[/]  (forge generate {summary['checkpoint']} --prompt ...)"
        )


def _go_on(config: TrainConfig) -> str:
    """The flags that continue an interrupted run: its step count, or a time budget (a fresh one, from the step)."""
    if config.budget is not None:
        left = f"--steps {config.steps} " if config.steps else ""
        return f"{left}--time {format_duration(config.budget)} (a time budget starts afresh on a resume)"
    return f"--steps {config.total_steps}"


def _interrupted(result: TrainResult, data: Path, config: TrainConfig) -> None:
    """Ctrl-C saved a checkpoint: say where and how to go on, and exit 130 so `forge train ... && next` stops."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if result.checkpoint is None:
        err.print(f"interrupted at step {result.step}; no checkpoint was saved", markup=False)
    else:
        ckpt = shlex.quote(str(result.checkpoint))
        err.print(
            f"interrupted at step {result.step}; checkpoint saved to {result.checkpoint}; resume with: "
            f"forge train {shlex.quote(str(data))} --resume {ckpt} {_go_on(config)} (plus this run's other options)",
            markup=False,
        )
    raise SystemExit(130)


def _budget_line(result: TrainResult) -> str | None:
    """How a time budget was spent, in one line (None without a budget)."""
    t = result.timing
    if t.get("budget") is None:
        return None
    budget, total = t["budget"] or 0.0, t.get("total") or 0.0
    return (
        f"time budget {format_duration(budget)}: {t.get('steps') or 0:.1f} s on {result.step} steps, "
        f"{t.get('eval') or 0:.1f} s evaluating, {t.get('checkpoint') or 0:.1f} s saving; "
        f"{total:.1f} s in all ({100 * total / budget:.0f}% of the budget), "
        f"plus {t.get('prepare') or 0:.1f} s reading the data and its tokenizer before the clock started"
    )


def _summary(console: Console, result: TrainResult) -> None:
    line = _budget_line(result)
    if line:
        console.print(line)
    if len(result.evals) == 1:
        console.print(f"val loss {result.evals[0][1]:.4f} (step {result.evals[0][0]})")
    elif result.evals:
        first, last = result.evals[0], result.evals[-1]
        console.print(f"val loss {first[1]:.4f} (step {first[0]}) -> {last[1]:.4f} (step {last[0]})")
    if result.checkpoint:
        console.print(f"saved to [bold]{result.checkpoint}[/]  (forge generate {result.checkpoint} --prompt ...)")


@cli.command("generate")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@field_options(GenerationConfig, GENERATION_FLAGS)
@field_option(GenerationConfig, "stop", multiple=True, help="Stop sequence (repeatable).")
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@DEVICE_OPTION
@QUANTIZE_OPTION
@COMPILE_OPTION
@DRAFT_OPTION
def generate_cmd(
    model_dir: Path,
    prompt: str,
    stream: bool,
    device: str,
    quantize: str | None,
    compile: bool,
    draft: str | None,
    **options: Any,
) -> None:
    """Continue PROMPT with MODEL_DIR: a Forge checkpoint, a GGUF file, an HF folder or a known name."""
    dev = resolve_device(device)
    options["speculate"] = speculate_with(draft, options["speculate"])
    loaded = models.load(model_dir, device=dev)
    if quantize is not None:
        quantize_model(loaded.model, quantize)
    drafter = load_draft(draft, loaded.tokenizer, dev) if draft is not None else None
    gen = Generator(loaded.model, loaded.tokenizer, compile=compile, draft=drafter)
    config = GenerationConfig(**options)
    if stream:
        click.echo(prompt, nl=False)
        for piece in gen.stream(prompt, config):
            click.echo(piece, nl=False)
        click.echo()
    else:
        click.echo(prompt + gen.generate(prompt, config))


@cli.command("info")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info_cmd(model_dir: Path, as_json: bool) -> None:
    """Show a model's architecture, parameter count and training state.

    MODEL_DIR is a Forge checkpoint, a GGUF file, a Hugging Face folder or a known name.
    """
    info = models.describe(model_dir)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    console = _console()
    kind = {"gguf": "GGUF file", "hf": "Hugging Face folder"}.get(info["format"], "forge checkpoint")
    table = Table(title=f"{kind} {model_dir}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    cfg, source = info["config"], info["source"]
    if source:
        table.add_row("architecture", f"{source.get('architecture')} ({source.get('name') or 'unnamed'})")
    table.add_row("family", info["family"])
    table.add_row("parameters", f"{info['parameters']:,} ({info['non_embedding_parameters']:,} non-embedding)")
    table.add_row(
        "shape",
        f"{cfg['n_layer']} layers, d_model {cfg['d_model']}, {cfg['n_head']} heads"
        + (f" ({cfg['n_kv_head']} kv)" if cfg.get("n_kv_head") else ""),
    )
    table.add_row("weights in memory", f"{info['weight_bytes'] / 1e6:.1f} MB")
    table.add_row("context", str(cfg["context_length"]))
    table.add_row("vocab", f"{cfg['vocab_size']} (tokenizer {info['tokenizer_vocab']})")
    table.add_row("norm / mlp / positions", f"{cfg['norm']} / {cfg['activation']} / {cfg['position']}")
    if source.get("quant_types"):  # GGUF: the file type and the tensor types it holds
        table.add_row("quantization", f"{source.get('file_type')} (tensors: {', '.join(source['quant_types'])})")
    elif source.get("torch_dtype"):
        table.add_row("dtype", str(source["torch_dtype"]))
    table.add_row("chat template", "yes" if info["chat_template"] else "no (chat uses a plain User:/Assistant: format)")
    if not source:
        table.add_row("step", str(info["step"]))
    metrics = info.get("metrics") or {}
    for key in ("train_loss", "val_loss"):
        if metrics.get(key) is not None:
            table.add_row(key.replace("_", " "), f"{metrics[key]:.4f}")
    if info["meta"].get("data"):
        table.add_row("data", str(info["meta"]["data"]))
    console.print(table)


def default_optimizer(resume: Path | None, model: str | None, strategy: str) -> str:
    """`forge train`'s optimizer when none is named: Muon for a new model, which reached 3.15 bits per byte on
    held-out text in 120 s on a 2-core CPU against AdamW's 3.23 with GPT-2-style blocks at lr 1e-3 (with the
    auto preset's Llama-style blocks at lr 3e-3 the two are within noise, 3.04 and 3.03 in d016026's run of
    benchmarks/quality_cpu.py --compare-optimizers); AdamW to fine-tune a pretrained model or under FSDP (Muon
    needs whole matrices); a resumed run keeps its own."""
    if resume is not None:
        state = read_training_state(resume) or {}
        return str((state.get("train_config") or {}).get("optimizer", "adamw"))
    return "adamw" if model is not None or strategy == "fsdp" else "muon"


DEMO_PROMPTS = ("Return the", "This module provides", "If the file")


@cli.command("demo")
@click.option("--seconds", type=POSITIVE_FLOAT, default=120.0, show_default=True, help="Training time budget.")
@field_option(TrainConfig, "steps", default=None, help="Train exactly this many steps instead.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("forge-demo"), show_default=True)
@DEVICE_OPTION
@field_option(TrainConfig, "seed")
def demo_cmd(seconds: float, steps: int | None, out: Path, device: str, seed: int) -> None:
    """Train a model sized for the time budget on the Python standard library's docstrings, then sample from it."""
    console = _console()
    dev = resolve_device(device)
    corpus = stdlib_corpus()
    console.print(
        f"[bold]forge demo[/]: training a model on the docstrings of Python's standard library "
        f"({corpus.stat().st_size / 1e6:.1f} MB of text every Python install has)."
    )
    started = time.perf_counter()
    # The same time budget as `forge train --time`: the schedule is planned from the measured step time.
    result = train(
        corpus,
        preset="auto",
        out=out,
        device=str(dev),
        steps=steps,
        max_seconds=None if steps else seconds,
        batch_size=16,
        optimizer=default_optimizer(None, None, "auto"),
        eval_every=-(-steps // 5) if steps else 0,
        seed=seed,
        listeners=[TrainingDisplay(console)],
        announce=console.print,
    )
    console.print(f"trained {result.step} steps in {time.perf_counter() - started:.0f} s")
    _summary(console, result)
    gen = Generator(result.model, result.tokenizer)
    console.rule("samples")
    for prompt in DEMO_PROMPTS:
        text = gen.generate(
            prompt, max_tokens=60, temperature=0.6, top_k=40, repetition_penalty=1.1, seed=seed, stop=["\n\n"]
        )
        console.print(f"[bold]{prompt}[/]{text}\n", markup=True, emoji=False)
