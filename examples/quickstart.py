"""Quick start: train a tiny model, generate, stream, save — async, then the same with the sync facade.

    python examples/quickstart.py [DATA]

DATA is any text file (default: the Python standard library's docstrings,
which every machine has). FORGE_EXAMPLE_STEPS sets the training steps.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

from forge import Forge, logger, timer
from forge.data import stdlib_corpus

DATA = sys.argv[1] if len(sys.argv) > 1 else str(stdlib_corpus())
STEPS = int(os.environ.get("FORGE_EXAMPLE_STEPS", "300"))
OUT = Path(tempfile.mkdtemp(prefix="forge-quickstart-"))


async def main() -> None:
    app = (
        Forge(model="tiny")  # a preset name or a checkpoint directory
        .use(logger(print))  # middleware, applied in order around every generation
        .use(timer())
        .on("step", lambda e: print(e.step, round(e.loss, 3)) if e.step % 50 == 0 else None)
    )
    await app.train(DATA, steps=STEPS, batch_size=16, context=128)  # async by default
    text = await app.generate("Return the", max_tokens=50, seed=0)
    print("generate:", repr(text))
    async for piece in app.stream("Return the", max_tokens=50, seed=0):
        print(piece, end="", flush=True)
    print()
    app.save(OUT / "async")


def main_sync() -> None:
    """The same program for scripts and notebooks: `app.sync` blocks instead of awaiting."""
    app = Forge(model="tiny").use(logger(print)).use(timer())
    app.sync.train(DATA, steps=STEPS, batch_size=16, context=128)
    print("generate:", repr(app.sync.generate("Return the", max_tokens=50, seed=0)))
    for piece in app.sync.stream("Return the", max_tokens=50, seed=0):
        print(piece, end="", flush=True)
    print()
    app.save(OUT / "sync")


if __name__ == "__main__":
    asyncio.run(main())
    main_sync()
    print(f"saved to {OUT}/async and {OUT}/sync")
