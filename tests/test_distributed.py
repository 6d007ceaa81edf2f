"""Distributed training on CPU with gloo: 2 processes against 1, a killed rank and resume, the CLI end to end.

The 1-process runs join a process group of one inside the test process (no launcher, to save a spawn);
the 2-process runs go through torch.distributed's launcher, as `forge train --nproc 2` does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from forge import distributed
from forge.cli import main
from forge.core.distributed import World, choose_strategy
from forge.data import Corpus, TokenDataset
from forge.distributed import DistributedConfig, RunSpec, last_checkpoint_step, launch, run_worker
from forge.errors import ConfigError, ForgeError
from forge.events import Event, StepEvent
from forge.models import create_model, load
from forge.tokenizer import Tokenizer
from forge.trainer import TrainConfig

TOL = 1e-5
#: Final weights after a resume or through the CLI: every element within WEIGHTS_TOL, and all but 1 in 10,000
#: within TOL. AdamW divides each update by the root of its squared gradients, so an element whose gradient is a
#: near-cancelling sum turns the last-bit differences of another summation order into an update difference of
#: order lr: on one AMD EPYC host a single element of 140k moved 1.4e-5 (lr 5e-4), at this commit and at the one
#: before, and every other stayed within 1e-6. A missing gradient average or a wrong shard moves every element by
#: about lr a step; the losses are compared at TOL.
WEIGHTS_TOL = 1e-4
OUTLIERS = 1e-4


@pytest.fixture(scope="module")
def text(hamlet_text: str) -> str:
    return hamlet_text[:40_000]


def _config(batch_size: int, **overrides: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        steps=10,
        batch_size=batch_size,
        context=32,
        eval_every=5,
        eval_batches=2,
        precision="float32",
        seed=3,
        lr=5e-4,
        checkpoint_every=5,
        compile=False,
    )
    return TrainConfig(**{**base, **overrides})


def _spec(text: str, out: Path, strategy: str, batch_size: int, resume: Path | None = None) -> RunSpec:
    return RunSpec(
        data=(text,),
        config=_config(batch_size),
        out=str(out),
        resume=str(resume) if resume else None,
        tokenizer="char",
        device="cpu",
        strategy=strategy,
    )


def _one_process(spec: RunSpec, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A run in a process group of one, here: the baseline 2 processes must match."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    for key, value in {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    return run_worker(spec)


def _max_diff(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> float:
    assert [s for s, _ in a] == [s for s, _ in b]
    return max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True))


def _weights_match(a: Path, b: Path) -> bool:
    """Whether two checkpoints' weights agree: every element within WEIGHTS_TOL, nearly all within TOL."""
    wa, wb = load(a).model.state_dict(), load(b).model.state_dict()
    assert wa.keys() == wb.keys()
    diffs = torch.cat([(wa[k] - wb[k]).abs().flatten().float() for k in wa])
    return float(diffs.max()) < WEIGHTS_TOL and int((diffs >= TOL).sum()) <= OUTLIERS * diffs.numel()


def _killing_entry(spec: RunSpec, pids: str) -> dict[str, Any]:
    """A worker that, on rank 0 after step 7, SIGKILLs rank 1 (a crash no handler sees)."""
    world = World.from_env()
    assert world is not None
    Path(pids, f"rank{world.rank}").write_text(str(os.getpid()))

    def kill_rank_1(event: Event) -> None:
        if isinstance(event, StepEvent) and event.step == 7:
            os.kill(int(Path(pids, "rank1").read_text()), signal.SIGKILL)

    return run_worker(spec, listeners=[kill_rank_1])


def test_killed_rank_stops_the_run_and_resume_on_2_or_1_matches(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    with pytest.raises(ForgeError) as caught:
        launch(_killing_entry, (_spec(text, out, "fsdp", 2), str(tmp_path)), DistributedConfig(nproc=2), out=out)
    message = caught.value.message
    assert "rank 1 was killed by SIGKILL" in message and "rank1.log" in message
    assert f"last checkpoint (step 5) is intact in {out}" in message
    assert last_checkpoint_step(out) == 5
    shutil.copytree(out, tmp_path / "copy")

    reference = _one_process(_spec(text, tmp_path / "ref", "fsdp", 4), monkeypatch)
    on_two = distributed.train(
        [text], out=out, resume=out, nproc=2, strategy="fsdp", tokenizer="char", device="cpu", config=_config(2)
    )
    # FSDP on 2 processes (5 steps, then 5 more after the crash) against 1 process throughout.
    assert [s for s, _ in on_two.losses] == list(range(6, 11))
    assert _max_diff(on_two.losses, reference["losses"][5:]) < TOL
    assert _max_diff(on_two.evals, reference["evals"][-1:]) < TOL
    assert on_two.losses[-1][1] < reference["losses"][0][1] - 0.2  # it learned: the parity is not of noise
    on_one = _one_process(_spec(text, tmp_path / "copy", "ddp", 4, resume=tmp_path / "copy"), monkeypatch)
    assert _max_diff(on_one["losses"], reference["losses"][5:]) < TOL  # FSDP shards of 2 ranks, loaded by DDP on 1
    assert _weights_match(out, tmp_path / "ref")


def test_cli_nproc_2_matches_one_process_then_generate(
    text: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, out = tmp_path / "small.txt", tmp_path / "cli-run"
    data.write_text(text)
    cfg = _config(2)
    flags = ["--tokenizer", "char", "--preset", "tiny", "--no-compile", "--precision", "fp32", "--seed", str(cfg.seed)]
    flags += [
        f"--{k.replace('_', '-')}={getattr(cfg, k)}" for k in ("steps", "batch_size", "context", "lr", "optimizer")
    ]
    flags += [f"--{k.replace('_', '-')}={getattr(cfg, k)}" for k in ("eval_every", "eval_batches", "checkpoint_every")]
    assert main(["train", str(data), "--nproc", "2", "--strategy", "ddp", "--out", str(out), *flags]) == 0
    printed = capfd.readouterr().out
    assert "2 processes (gloo), strategy ddp" in printed and f"saved to {out}" in printed
    assert (out / "shards" / ".metadata").is_file() and (tmp_path / "cli-run.logs" / "rank1.log").is_file()
    assert main(["generate", str(out), "--prompt", "HAMLET", "--max-tokens", "12", "--temperature", "0"]) == 0
    generated = capfd.readouterr().out
    assert generated.startswith("HAMLET") and len(generated.rstrip("\n")) > len("HAMLET")
    # Resuming a distributed checkpoint on the single-process trainer says how to resume it instead.
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(data), "--resume", str(out), "--steps", "12", "--tokenizer", "char"])
    assert exit_info.value.code == 2
    assert "--nproc N" in capfd.readouterr().err
    # DDP on 2 processes of 2 sequences against 1 process of 4: the same final weights and losses.
    one = _one_process(
        RunSpec(
            data=str(data), config=_config(4), out=str(tmp_path / "one"), tokenizer="char", device="cpu", strategy="ddp"
        ),
        monkeypatch,
    )
    assert _weights_match(out, tmp_path / "one")
    metrics = load(out, with_state=True).training_state["metrics"]  # type: ignore[index]
    assert (
        abs(metrics["train_loss"] - one["losses"][-1][1]) < TOL and abs(metrics["val_loss"] - one["evals"][-1][1]) < TOL
    )


def test_shards_of_a_global_batch_cover_what_one_rank_draws(char_tokenizer: Tokenizer, text: str) -> None:
    ds = TokenDataset.build(Corpus.from_source([text]), char_tokenizer)
    whole, _ = ds.shard_batch("train", 6, 16, seed=1, index=4)
    parts = [ds.shard_batch("train", 2, 16, seed=1, index=4, rank=r, world_size=3)[0] for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    again, _ = ds.shard_batch("train", 6, 16, seed=1, index=4)
    other, _ = ds.shard_batch("train", 6, 16, seed=1, index=5)
    assert torch.equal(again, whole) and not torch.equal(other, whole)
    assert int(whole.max()) < char_tokenizer.vocab_size and np.all(whole.numpy() >= 0)


def test_auto_strategy_picks_fsdp_when_the_model_does_not_fit() -> None:
    model = create_model("tiny", vocab_size=256)
    assert choose_strategy(model, torch.device("cpu"), local_size=1)[0] == "ddp"
    strategy, why = choose_strategy(model, torch.device("cpu"), local_size=10**9)  # a sliver of memory each
    assert strategy == "fsdp" and "do not fit" in why


def test_distributed_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="node_rank"):
        DistributedConfig(nnodes=2, node_rank=2, rdzv_endpoint="10.0.0.1:29500")
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        DistributedConfig(nnodes=2)
    with pytest.raises(ConfigError, match="strategy"):
        DistributedConfig(nproc=2, strategy="zero3")
    assert not DistributedConfig().launches and DistributedConfig(nproc=1).launches
