"""Answers a user can trust: RAG answers and agent tool use with SmolLM2-135M, against the code before.

RAG: each question of benchmarks/data/shakespeare_answers.json (65, on which the
settings were tuned) and shakespeare_answers_heldout.json (45, written after and
never used to tune) has a short answer that is a span of one play. The 42 texts are ingested once into a
store that later runs reuse (unchanged files are skipped). An answer counts
as correct when it contains the answer or one of its aliases (case, spacing
and punctuation ignored), and its citation as correct when a source it cites
contains the answer. Unanswerable questions (facts not in Shakespeare) count
as handled when the answer says the sources do not contain it.

Agents: benchmarks/answers_agent.py's tool tasks.

Baseline in the same run: the same evaluation on the code of ``--baseline``
(a git revision, default the commit before this benchmark), extracted with
``git archive`` and run in a subprocess with it on PYTHONPATH. Both sides use
the same store, questions, k and token limit.

    python benchmarks/answers.py [--part rag|agent|all] [--limit N] [--k 5] [--modes quote,free]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, SHAKESPEARE, environment, save_result

QUESTIONS = ROOT / "benchmarks" / "data" / "shakespeare_answers.json"
#: Questions written after the settings were chosen on QUESTIONS, and never used to choose them.
HELDOUT = ROOT / "benchmarks" / "data" / "shakespeare_answers_heldout.json"
QUESTION_SETS = {"tuned": QUESTIONS, "heldout": HELDOUT}
BASELINE = "22a8872"  # main before issue 15: free-form answers, the agent loop as it was
STORE = Path(tempfile.gettempdir()) / "forge-bench" / "shakespeare-answers.db"
MAX_TOKENS = 64

#: Questions whose answers are not in Shakespeare: the right answer says the sources don't hold it.
UNANSWERABLE = [
    "What is the boiling point of water in kelvin?",
    "Who wrote Pride and Prejudice?",
    "What year did the first man land on the moon?",
    "What is the capital city of Australia?",
    "How many bytes are in a kilobyte?",
    "Which programming language did Guido van Rossum create?",
    "What is the speed of light in a vacuum?",
    "Who painted the Mona Lisa?",
]


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("\u2019", "'")).split())


def _contains(text: str, answers: list[str]) -> bool:
    padded = f" {_norm(text)} "
    return any(f" {_norm(a)} " in padded for a in answers if _norm(a))


def _declined(text: str, citations: list[Any]) -> bool:
    """Says the sources lack the answer (today's NOT_FOUND, or the old prompt's "I don't know"), citing nothing."""
    said = _norm(text)
    return not citations and any(p in said for p in ("do not contain the answer", "don't know", "do not know"))


def _ask(rag: Any, question: str, k: int | None, mode: str | None) -> Any:
    """One answer; ``mode`` None is the baseline's API (no modes); ``k`` None is the side's own default."""
    options: dict[str, Any] = {"max_tokens": MAX_TOKENS, **({} if k is None else {"k": k})}
    if mode is not None:
        options["mode"] = mode
    return rag.answer(question, **options)


def evaluate_rag(
    db: Path, k: int | None, limit: int | None, modes: list[str | None], questions_file: Path = QUESTIONS
) -> dict[str, Any]:
    """Every question through every mode, with whatever ``forge`` is importable."""
    from forge.rag import Rag

    questions = json.loads(questions_file.read_text())[:limit]
    unanswerable = UNANSWERABLE[: None if limit is None else max(2, limit // 6)]
    rag = Rag(db)
    out: dict[str, Any] = {}
    for mode in modes:
        rows, began = [], time.perf_counter()
        for q in questions:
            answer = _ask(rag, q["question"], k, mode)
            golds = [q["answer"], *q.get("aliases", [])]
            rows.append(
                {
                    "question": q["question"],
                    "answer": answer.text,
                    "correct": _contains(answer.text, golds),
                    "cited": bool(answer.citations),
                    "citation_correct": any(_contains(c.text, golds) for c in answer.citations),
                    "retrieved": any(_contains(s.text, golds) for s in answer.sources),
                    "words": len(answer.text.split()),
                }
            )
        declined = [
            {"question": u, "answer": (a := _ask(rag, u, k, mode)).text, "declined": _declined(a.text, a.citations)}
            for u in unanswerable
        ]
        n = len(rows)
        out[str(mode or "baseline")] = {
            "questions": n,
            "correct": sum(r["correct"] for r in rows) / n,
            "with_citation": sum(r["cited"] for r in rows) / n,
            "citation_correct": sum(r["citation_correct"] for r in rows) / n,
            "answer_retrieved": sum(r["retrieved"] for r in rows) / n,
            "mean_words": sum(r["words"] for r in rows) / n,
            "unanswerable_declined": sum(d["declined"] for d in declined) / max(1, len(declined)),
            "seconds_per_question": (time.perf_counter() - began) / (n + len(declined)),
            "rows": rows,
            "unanswerable": declined,
        }
    rag.close()
    return out


def _ingest(db: Path) -> str:
    from forge.rag import Rag

    db.parent.mkdir(parents=True, exist_ok=True)
    rag = Rag(db)
    report = rag.add([SHAKESPEARE])
    rag.close()
    return report.summary()


def _baseline_src(rev: str, into: Path) -> Path:
    """``rev``'s src/ tree, extracted (git archive: no worktree, no change to the repository)."""
    data = subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def _worker(src: Path, args: list[str]) -> dict[str, Any]:
    """A script of this folder, run with ``src`` as the ``forge`` package; it prints its result as JSON."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} with {src} failed:\n{done.stderr[-3000:]}")
    text = done.stdout.strip()
    try:  # the agent script prints one JSON object, indented; the RAG worker one line after its progress
        return json.loads(text)  # type: ignore[no-any-return]
    except json.JSONDecodeError:
        return json.loads(text.splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["rag", "agent", "all"], default="all")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions / tasks")
    p.add_argument("--k", type=int, default=None, help="chunks searched (default: each side's own default)")
    p.add_argument("--modes", default="quote,free")
    p.add_argument("--baseline", default=BASELINE, help="git revision whose behaviour is the baseline")
    p.add_argument("--db", type=Path, default=STORE)
    p.add_argument("--sets", default="tuned,heldout", help=f"question sets, of {', '.join(QUESTION_SETS)}")
    p.add_argument("--questions", type=Path, default=QUESTIONS, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:  # inside a subprocess: evaluate with the forge on PYTHONPATH
        modes: list[str | None] = [None] if a.modes == "baseline" else list(a.modes.split(","))
        print(json.dumps(evaluate_rag(a.db, a.k, a.limit, modes, a.questions)))
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out: dict[str, Any] = {"benchmark": "answers", **environment(torch.device("cpu")), "baseline": a.baseline}
    with tempfile.TemporaryDirectory() as tmp:
        old = _baseline_src(a.baseline, Path(tmp))
        new = ROOT / "src"
        limit = [] if a.limit is None else ["--limit", str(a.limit)]
        if a.part in ("rag", "all"):
            began = time.perf_counter()
            out["ingest"] = _ingest(a.db)
            out["ingest_seconds"] = time.perf_counter() - began
            k = [] if a.k is None else ["--k", str(a.k)]
            out["rag"] = {}
            for name in a.sets.split(","):
                common = [__file__, "--worker", "--db", str(a.db), "--questions", str(QUESTION_SETS[name]), *k, *limit]
                out["rag"][name] = {
                    **_worker(old, [*common, "--modes", "baseline"]),
                    **_worker(new, [*common, "--modes", a.modes]),
                }
        if a.part in ("agent", "all"):
            script = str(ROOT / "benchmarks" / "answers_agent.py")
            tasks = [] if a.limit is None else ["--tasks", str(a.limit)]
            out["agent"] = {"baseline": _worker(old, [script, *tasks]), "forge": _worker(new, [script, *tasks])}
    save_result("answers_cpu" if a.part == "all" else f"answers_{a.part}_cpu", out)
    print(json.dumps(_brief(out), indent=1))


def _brief(out: dict[str, Any]) -> dict[str, Any]:
    """The figures of ``out`` without the per-question rows."""

    def figures(sides: dict[str, Any]) -> dict[str, Any]:
        return {side: {k: v for k, v in f.items() if not isinstance(v, (list, dict))} for side, f in sides.items()}

    brief: dict[str, Any] = {name: figures(sides) for name, sides in out.get("rag", {}).items()}
    if "agent" in out:
        brief["agent"] = figures(out["agent"])
    return brief


if __name__ == "__main__":
    main()
