"""Training with events: progress, evaluation, checkpoints; then resume from the checkpoint.

    python examples/training.py [DATA]

Shows the typed events (start, step, eval, checkpoint, end), a listener that
fails without stopping training (it becomes an "error" event), and that a
loaded checkpoint continues training where it stopped.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

from forge import EndEvent, ErrorEvent, EvalEvent, Forge, StartEvent, StepEvent
from forge.data import stdlib_corpus

DATA = sys.argv[1] if len(sys.argv) > 1 else str(stdlib_corpus())
STEPS = int(os.environ.get("FORGE_EXAMPLE_STEPS", "200"))
OUT = Path(tempfile.mkdtemp(prefix="forge-training-")) / "run"


def on_start(e: StartEvent) -> None:
    print(f"training {e.parameters:,} parameters on {e.device} ({e.precision}), {e.train_tokens:,} tokens")


def on_step(e: StepEvent) -> None:
    if e.step % 25 == 0:
        print(f"step {e.step}/{e.total_steps} loss {e.loss:.3f} lr {e.lr:.1e} {e.tokens_per_sec:,.0f} tok/s")


def flaky(e: StepEvent) -> None:
    if e.step == 3:
        raise RuntimeError("a buggy listener")


async def main() -> None:
    errors: list[ErrorEvent] = []
    app = (
        Forge(model="llama-tiny")  # RMSNorm, SwiGLU, RoPE, grouped-query attention
        .on("start", on_start)
        .on("step", on_step)
        .on("step", flaky)
        .on("eval", lambda e: print(f"  eval @ {e.step}: val loss {e.val_loss:.3f}, perplexity {e.val_perplexity:.0f}"))
        .on("checkpoint", lambda e: print(f"  checkpoint @ {e.step} -> {e.path}"))
        .once("end", lambda e: print(f"done at step {e.step}, val loss {e.val_loss:.3f}"))
        .on("error", errors.append)
    )
    first = await app.train(DATA, steps=STEPS, batch_size=16, context=128, eval_every=STEPS // 2, out=OUT)
    print(f"the failing listener raised {len(errors)} time(s); training went on to step {first.step}")

    resumed = Forge.load(OUT).on("end", lambda e: print(f"resumed run ended at step {e.step}"))
    # steps counts in total, as everywhere: a quarter more
    result = await resumed.train(DATA, steps=STEPS + STEPS // 4, batch_size=16, context=128, eval_every=0)
    assert isinstance(result.step, int)
    print(resumed.info()["step"], "steps in total")
    print(await resumed.generate("The default", max_tokens=30, temperature=0.6, seed=1))


if __name__ == "__main__":
    asyncio.run(main())
    _ = EndEvent, EvalEvent  # the other event types, for reference
