"""``forge rag add | ask | ls | rm``: a folder of documents to cited answers, offline."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from forge.app import Forge
from forge.cli.commands import cli
from forge.cli.options import (
    DEVICE_OPTION,
    INFERENCE_DTYPE_OPTION,
    POSITIVE_INT,
    AliasedOption,
    field_option,
)
from forge.errors import DataError, StoreError
from forge.generator import GenerationConfig
from forge.rag.loaders import printable
from forge.rag.retrieval import IngestProgress, IngestReport, Rag, cited, open_store
from forge.rag.store import VectorStore
from forge.server.config import ServerConfig

__all__ = ["IngestDisplay", "existing_store", "rag"]

#: Seconds between plain progress lines when stdout is not a terminal (a log file).
PLAIN_INTERVAL = 10.0

DB_OPTION = click.option(
    "--db",
    default="forge-rag.db",
    show_default=True,
    help="The store: a SQLite file, or a postgresql:// URL (pgvector).",
)


def _is_url(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def existing_store(db: str) -> VectorStore:
    if not _is_url(db) and not Path(db).is_file():
        raise StoreError(f"no store at {db!r}; create it with: forge rag add PATH --db {db}")
    return open_store(db)


def _name(text: str) -> str:
    """A file name or source for the terminal: control characters escaped, rich markup inert."""
    return escape(printable(text))


class IngestDisplay:
    """Progress of ``forge rag add``: files done / total as a bar on a terminal, plain lines in a log file.

    Plain lines come at most every ``interval`` seconds, plus the first and the last, so a log shows
    a long ingest moving without a line per file.
    """

    def __init__(
        self, console: Console, *, interval: float = PLAIN_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.console, self.interval, self.clock = console, interval, clock
        self.started = clock()
        self._last: float | None = None
        self._bar: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> IngestDisplay:
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]ingest"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("files  {task.fields[detail]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("ingest", total=None, detail="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, p: IngestProgress) -> None:
        detail = printable(Path(p.source).name)
        if p.chunks_total:
            detail += f" ({p.chunks_done}/{p.chunks_total} chunks embedded)"
        if self._bar is not None:
            self._bar.update(self._task, total=p.files_total, completed=p.files_done, detail=escape(detail))
            return
        now = self.clock()
        if self._last is not None and now - self._last < self.interval and p.files_done < p.files_total:
            return
        self._last = now
        elapsed = int(now - self.started)
        self.console.print(
            f"ingest: {p.files_done}/{p.files_total} files, {detail}, {elapsed // 60}m{elapsed % 60:02d}s",
            markup=False,
        )


@contextlib.contextmanager
def _new_store_cleanup(db: str) -> Iterator[Callable[[Rag], None]]:
    """Remove a store file this command created if it ends with no sources: no empty database left behind.

    Yields a function to call with the Rag before it closes, to learn whether anything was stored.
    """
    created = not _is_url(db) and not os.path.lexists(db)
    stored = [False]

    def check(rag: Rag) -> None:
        try:
            stored[0] = bool(rag.store.sources())
        except Exception:  # a broken store: keep whatever is there
            stored[0] = True

    try:
        yield check
    finally:
        if created and not stored[0]:
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(db + suffix)


@cli.group("rag")
def rag() -> None:
    """Retrieval-augmented answers over your documents (.txt, .md, .html, .pdf)."""


@rag.command("add")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@DB_OPTION
@click.option("--chunk-tokens", type=POSITIVE_INT, default=128, show_default=True, help="Tokens per chunk.")
@click.option(
    "--chunk-overlap",
    cls=AliasedOption,
    aliases=("--overlap",),  # its old name, kept for scripts
    type=click.IntRange(min=0),
    default=32,
    show_default=True,
    help="Tokens shared by neighbouring chunks.",
)
def add_cmd(paths: tuple[Path, ...], db: str, chunk_tokens: int, chunk_overlap: int) -> None:
    """Ingest PATHS (files or folders, recursively) into the store; unchanged files are skipped."""
    console = Console(highlight=False, soft_wrap=True)
    missing = [p for p in paths if not os.path.lexists(p)]
    if len(missing) == len(paths):  # before the store is created: nothing to add, nothing to leave behind
        names = ", ".join(repr(printable(str(p))) for p in missing)
        raise DataError(f"nothing to add: no such file or folder {names} (relative to {Path.cwd()}); check the path")
    report = _ingest(console, paths, db, chunk_tokens, chunk_overlap)
    console.print(escape(report.summary()))
    if report.failures and not report.added and not report.unchanged:
        raise SystemExit(1)


def _ingest(console: Console, paths: tuple[Path, ...], db: str, chunk_tokens: int, chunk_overlap: int) -> IngestReport:
    with _new_store_cleanup(db) as check:
        rag = Rag(db, chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap)
        try:
            with IngestDisplay(console) as display:
                return rag.add(paths, progress=display)
        finally:
            check(rag)
            rag.close()


@rag.command("ask")
@click.argument("question")
@DB_OPTION
@click.option("--model", default="smollm2", show_default=True, help="The chat model that answers.")
# The same options as `forge serve`'s chats over a store: one name each (--k and --mode are their old names here).
@field_option(ServerConfig, "rag_k", aliases=("--k",), help="Chunks searched [default: 12 to quote, 5 free].")
@field_option(GenerationConfig, "max_tokens", default=256, help="Longest answer, in tokens.")
@field_option(
    ServerConfig,
    "rag_mode",
    aliases=("--mode",),
    help="quote: the answer quotes the sources word for word (best for small models); free: its own words, "
    "still citing a source.",
)
@DEVICE_OPTION
@INFERENCE_DTYPE_OPTION
def ask_cmd(
    question: str, db: str, model: str, rag_k: int | None, max_tokens: int, rag_mode: str, device: str, dtype: str
) -> None:
    """Answer QUESTION from the store, citing the passages used, or saying that they don't hold the answer."""
    console = Console(highlight=False, soft_wrap=True)
    store = existing_store(db)
    app = Forge(model, device=device, dtype=dtype)  # type: ignore[arg-type]
    rag = Rag(store, app=app)
    try:
        pieces, sources = rag.answer_stream(
            question,
            k=rag_k,
            mode=rag_mode,  # type: ignore[arg-type]
            max_tokens=max_tokens,
        )
        text = ""
        for piece in pieces:
            text += piece
            console.print(escape(printable(piece, keep="\n\t")), end="")
        console.print()
    finally:
        rag.close()
    shown = cited(text, sources) or sources
    console.print("\n[bold]sources[/]" if cited(text, sources) else "\n[bold]retrieved[/]")
    for s in shown:
        excerpt = " ".join(s.text.split())[:100]
        console.print(f"  [{s.number}] {_name(s.source)} chars {s.start}-{s.end} ({s.score:.2f}): {_name(excerpt)}")


@rag.command("ls")
@DB_OPTION
def ls_cmd(db: str) -> None:
    """List the sources in the store."""
    console = Console(highlight=False, soft_wrap=True)
    with existing_store(db) as store:
        sources = store.sources()
        for s in sources:
            console.print(f"{s.chunks:6d} chunks  {_name(s.source)}")
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
            raise StoreError(f"not in the store: {', '.join(map(printable, missing))}; see forge rag ls --db {db}")
        for source in sources:
            name = source if source in known else str(Path(source).resolve())
            console.print(f"removed {_name(name)} ({store.delete(name)} chunks)")
