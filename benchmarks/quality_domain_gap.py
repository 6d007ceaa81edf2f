"""How much of quality_cpu's figure is the held-out text's domain: the same two arms, scored on a play they never saw.

quality_cpu scores models trained on Shakespeare on the GNU GPL v3, modern legal English. This benchmark trains
the same two arms for the same wall clock (Forge's defaults, ``forge train DATA --time``, and the plain
nanoGPT-style byte loop) on 41 of the 42 texts, leaving out one play chosen before any run (``--held-play``,
The Tempest), and scores each model on that play and on the GPL. The difference between the two figures is
what the text's domain costs, at equal model and compute.

With ``--smoothing 0,0.05`` Forge trains once more for each label smoothing listed (``forge_ls<value>``; the
defaults arm trains with the auto preset's own): what smoothing gains on the GPL and costs on the play, arms
interleaved over ``--rounds``; ``--no-plain`` leaves the plain loop out.

    python benchmarks/quality_domain_gap.py [--seconds 120] [--held-play tempest] [--smoothing 0,0.05 --rounds 2]
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
    parser.add_argument("--smoothing", default="", help="also Forge at each of these label smoothings (a,b,...)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every arm, interleaved")
    parser.add_argument("--no-plain", action="store_true", help="leave out the plain loop")
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
        runs: list[tuple[str, dict[str, Any]]] = []
        for _ in range(args.rounds):
            if not args.no_plain:
                runs.append(("plain_char_gpt", plain_arm(corpus_bytes(data), args.seconds, device, also=(play,))))
            runs.append(("forge", forge_arm(args.seconds, "cpu", data, also=(play,))))
            for value in filter(None, args.smoothing.split(",")):
                ls = forge_arm(args.seconds, "cpu", data, also=(play,), label_smoothing=float(value))
                runs.append((f"forge_ls{value}", ls))
    arms = dict(runs)  # the last round's; every round's under "runs"
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
        "runs": [
            {"arm": name, play.name: arm["also"][play.name], HELD_OUT.name: arm["bits_per_byte"]} for name, arm in runs
        ],
        "environment": environment(device),
    }
    save_result("quality_domain_gap_cpu" + ("_smoothing" if args.smoothing else ""), out)


if __name__ == "__main__":
    main()
