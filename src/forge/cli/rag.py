"""``forge rag add | ask | ls | rm``: a folder of documents to cited answers, offline."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from forge.app import Forge
from forge.cli.commands import DTYPE_OPTION, POSITIVE_INT, cli
from forge.core.device import DEVICES
from forge.errors import StoreError
from forge.rag.retrieval import Rag, cited, open_store
from forge.rag.store import VectorStore

__all__ = ["existing_store", "rag"]

DB_OPTION = click.option(
    "--db",
    default="forge-rag.db",
    show_default=True,
    help="The store: a SQLite file, or a postgresql:// URL (pgvector).",
)


def existing_store(db: str) -> VectorStore:
    if not db.startswith(("postgresql://", "postgres://")) and not Path(db).is_file():
        raise StoreError(f"no store at {db!r}; create it with: forge rag add PATH --db {db}")
    return open_store(db)


@cli.group("rag")
def rag() -> None:
    """Retrieval-augmented answers over your documents (.txt, .md, .html, .pdf)."""


@rag.command("add")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@DB_OPTION
@click.option("--chunk-tokens", type=POSITIVE_INT, default=128, show_default=True, help="Tokens per chunk.")
@click.option("--overlap", type=click.IntRange(min=0), default=32, show_default=True, help="Tokens shared by chunks.")
def add_cmd(paths: tuple[Path, ...], db: str, chunk_tokens: int, overlap: int) -> None:
    """Ingest PATHS (files or folders, recursively) into the store; unchanged files are skipped."""
    console = Console(highlight=False, soft_wrap=True)
    rag = Rag(db, chunk_tokens=chunk_tokens, chunk_overlap=overlap)
    try:
        with console.status("ingesting..."):
            report = rag.add(paths)
    finally:
        rag.close()
    console.print(escape(report.summary()))
    if report.failures and not report.added and not report.unchanged:
        raise SystemExit(1)


@rag.command("ask")
@click.argument("question")
@DB_OPTION
@click.option("--model", default="smollm2", show_default=True, help="The chat model that answers.")
@click.option("--k", type=POSITIVE_INT, default=5, show_default=True, help="Chunks retrieved.")
@click.option("--max-tokens", type=POSITIVE_INT, default=256, show_default=True, help="Longest answer, in tokens.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@DTYPE_OPTION
def ask_cmd(question: str, db: str, model: str, k: int, max_tokens: int, device: str, dtype: str) -> None:
    """Answer QUESTION from the store, citing the passages used."""
    console = Console(highlight=False, soft_wrap=True)
    store = existing_store(db)
    app = Forge(model, device=device, dtype=dtype)  # type: ignore[arg-type]
    rag = Rag(store, app=app)
    try:
        pieces, sources = rag.answer_stream(question, k=k, max_tokens=max_tokens)
        text = ""
        for piece in pieces:
            text += piece
            console.print(escape(piece), end="")
        console.print()
    finally:
        rag.close()
    shown = cited(text, sources) or sources
    console.print("\n[bold]sources[/]" if cited(text, sources) else "\n[bold]retrieved[/]")
    for s in shown:
        excerpt = " ".join(s.text.split())[:100]
        console.print(f"  [{s.number}] {escape(s.source)} chars {s.start}-{s.end} ({s.score:.2f}): {escape(excerpt)}")


@rag.command("ls")
@DB_OPTION
def ls_cmd(db: str) -> None:
    """List the sources in the store."""
    console = Console(highlight=False, soft_wrap=True)
    with existing_store(db) as store:
        sources = store.sources()
        for s in sources:
            console.print(f"{s.chunks:6d} chunks  {escape(s.source)}")
        console.print(f"{len(sources)} sources, {store.count()} chunks")


@rag.command("rm")
@click.argument("sources", nargs=-1, required=True)
@DB_OPTION
def rm_cmd(sources: tuple[str, ...], db: str) -> None:
    """Remove SOURCES (as `forge rag ls` names them) and their chunks."""
    console = Console(highlight=False, soft_wrap=True)
    with existing_store(db) as store:
        known = {s.source for s in store.sources()}
        missing = [s for s in sources if s not in known and str(Path(s).resolve()) not in known]
        if missing:
            raise StoreError(f"not in the store: {', '.join(missing)}; see forge rag ls --db {db}")
        for source in sources:
            name = source if source in known else str(Path(source).resolve())
            console.print(f"removed {escape(name)} ({store.delete(name)} chunks)")
