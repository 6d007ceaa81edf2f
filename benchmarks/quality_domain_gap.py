"""How much of quality_cpu's figure is the held-out text's domain: the same two arms, scored on a play they never saw.

quality_cpu scores models trained on Shakespeare on the GNU GPL v3, modern legal English. This benchmark trains
the same two arms for the same wall clock (Forge's defaults, ``forge train DATA --time``, and the plain
nanoGPT-style byte loop) on 41 of the 42 texts, leaving out one play chosen before any run (``--held-play``,
The Tempest), and scores each model on that play and on the GPL. The difference between the two figures is
what the text's domain costs, at equal model and compute.

    python benchmarks/quality_domain_gap.py [--seconds 120] [--held-play tempest]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from _common import SHAKESPEARE, environment, save_result
from quality_cpu import HELD_OUT, corpus_bytes, forge_arm, plain_arm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="Wall clock of each arm's training.")
    parser.add_argument("--held-play", default="tempest", help="the play left out of training (a file stem)")
    args = parser.parse_args()
    play = SHAKESPEARE / f"{args.held_play}.txt"
    if not play.is_file():
        raise SystemExit(f"no play {play}: pick a file stem of {SHAKESPEARE}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "shakespeare_41"
        data.mkdir()
        for text in sorted(SHAKESPEARE.glob("*.txt")):
            if text != play:
                (data / text.name).symlink_to(text)
        device = torch.device("cpu")
        plain = plain_arm(corpus_bytes(data), args.seconds, device, also=(play,))
        ours = forge_arm(args.seconds, "cpu", data, also=(play,))
    arms: dict[str, Any] = {"forge": ours, "plain_char_gpt": plain}
    out = {
        "benchmark": "quality_domain_gap",
        "seconds": args.seconds,
        "data": f"{SHAKESPEARE} without {play.name}",
        "scored_on": {"held_out_play": play.name, "quality_cpu_text": str(HELD_OUT)},
        "bits_per_byte": {
            name: {play.name: arm["also"][play.name], HELD_OUT.name: arm["bits_per_byte"]} for name, arm in arms.items()
        },
        "domain_cost_bits_per_byte": {
            name: round(arm["bits_per_byte"] - arm["also"][play.name], 4) for name, arm in arms.items()
        },
        "arms": arms,
        "environment": environment(device),
    }
    save_result("quality_domain_gap_cpu", out)


if __name__ == "__main__":
    main()
