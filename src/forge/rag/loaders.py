"""Documents from files: plain text, Markdown, HTML and PDF, with a failure record for each file that can't be read.

``load_documents`` never raises for a bad file. Each path comes back as a
``Document`` or as a ``LoadFailure`` that says what was wrong and the fix, so one
broken PDF in a folder of thousands costs that file, not the run::

    for item in load_documents(["docs/", "notes.md"]):
        if isinstance(item, LoadFailure):
            print(f"skipped {item}")
        else:
            index(item)

Text files must be UTF-8 (a byte-order mark is allowed). Other encodings are
reported, naming the first bad byte, rather than guessed: a wrong guess would put
mojibake into the index without a word. Only regular files are read (a FIFO would
block forever, a device never end), and a symbolic link inside a folder that points
out of it is reported, not followed: ingesting ``docs/`` must not read ``/etc/passwd``.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Literal

from pypdf import PdfReader
from pypdf.errors import DependencyError

__all__ = [
    "Document",
    "DocumentKind",
    "LoadFailure",
    "file_sha256",
    "html_to_text",
    "iter_files",
    "load_document",
    "load_documents",
    "printable",
    "walk_files",
]

DocumentKind = Literal["txt", "md", "html", "pdf"]

#: File extensions (lower case) and the kind of document each holds.
SUPPORTED_SUFFIXES: dict[str, DocumentKind] = {
    ".txt": "txt",
    ".md": "md",
    ".markdown": "md",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
}
_SUPPORTED = ", ".join(sorted(SUPPORTED_SUFFIXES))

PathLike = str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class Document:
    """The text of one file, with the hash of its bytes to tell when it changed.

    >>> doc = Document(source="notes.txt", text="To be.", sha256="0" * 64, kind="txt")
    >>> doc.kind, doc.text
    ('txt', 'To be.')
    """

    source: str
    text: str
    sha256: str
    kind: DocumentKind


@dataclass(frozen=True, slots=True)
class LoadFailure:
    """A file that could not be loaded: where it is, what was wrong and the fix.

    >>> print(LoadFailure(source="a.docx", reason="unsupported file type '.docx'"))
    a.docx: unsupported file type '.docx'
    """

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{printable(self.source)}: {printable(self.reason)}"


def printable(text: str, *, keep: str = "") -> str:
    """``text`` with control and format characters escaped, so a file name can't forge terminal output.

    A name holding a newline or an escape sequence would otherwise print as extra lines or move the
    cursor; ``keep`` names characters to leave alone (e.g. ``"\\n\\t"`` for an answer's text).

    >>> printable("a\\nb\\x1b[2J.txt")
    'a\\\\nb\\\\x1b[2J.txt'
    """
    if text.isprintable():  # the common case: nothing to do
        return text
    out = []
    for ch in text:
        if ch in keep or ch.isprintable():
            out.append(ch)
        else:  # C0/C1 controls, bidi overrides, zero-width and line separators, non-breaking spaces
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def file_sha256(path: PathLike, *, block_size: int = 1 << 20) -> str:
    """The SHA-256 hex digest of a file's bytes, read in blocks so large files need no memory.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile(suffix=".txt") as f:
    ...     _ = f.write(b"abc"); f.flush()
    ...     file_sha256(f.name)[:16]
    'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def iter_files(paths: Iterable[PathLike]) -> Iterator[Path]:
    """The files to load from ``paths``: each file named, and the supported files inside each folder.

    Folders are walked recursively in sorted order, skipping hidden files and
    folders (names starting with ``.``), files with unsupported extensions,
    symbolic links to folders (which can loop), and links, FIFOs and devices that
    ``walk_files`` reports. A path named directly is yielded as given even when it
    is missing, hidden or unsupported, and so is a folder that can't be listed:
    ``load_document`` then reports what is wrong with it, where skipping it would
    hide a typo. Each file comes once, however many times it is named.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     for name in ["b.md", "a.txt", ".hidden.txt", "image.png"]:
    ...         _ = (Path(d) / name).write_text("x")
    ...     [p.name for p in iter_files([d, Path(d) / "missing.txt"])]
    ['a.txt', 'b.md', 'missing.txt']
    """
    for item in walk_files(paths):
        if isinstance(item, Path):
            yield item


def walk_files(paths: Iterable[PathLike]) -> Iterator[Path | LoadFailure]:
    """``iter_files``, with a ``LoadFailure`` for each file found in a folder and skipped as unsafe.

    Inside a folder, a symbolic link whose target lies outside that folder, and a
    supported name that is not a regular file (a FIFO, socket or device), come
    back as failures: a link to ``/etc/passwd`` in ``docs/`` is reported, never read.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     (Path(d) / "in").mkdir()
    ...     (Path(d) / "in" / "passwd.txt").symlink_to("/etc/passwd")
    ...     [type(item).__name__ for item in walk_files([Path(d) / "in"])]
    ['LoadFailure']
    """
    seen: set[Path] = set()
    for named in paths:
        path = Path(named)
        found = _walk_folder(path, path.resolve()) if path.is_dir() else iter([path])
        for item in found:
            if isinstance(item, LoadFailure):
                yield item
                continue
            key = item.resolve()
            if key not in seen:
                seen.add(key)
                yield item


def _walk_folder(folder: Path, root: Path) -> Iterator[Path | LoadFailure]:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda entry: entry.name)
    except OSError:
        yield folder  # load_document says why it can't be listed
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = folder / entry.name
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_folder(path, root)
            continue
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            continue
        if entry.is_symlink():
            target = path.resolve()
            if not target.is_relative_to(root):
                yield LoadFailure(
                    str(path),
                    f"a symbolic link to {target}, outside the folder {root}; skipped "
                    "(name the file itself to load it)",
                )
                continue
        if entry.is_file():
            yield path
        elif path.exists() and not entry.is_dir():  # not a broken link, nor a link to a folder
            yield LoadFailure(str(path), _not_regular_reason(path))


def load_documents(paths: Iterable[PathLike]) -> Iterator[Document | LoadFailure]:
    """Load every file of ``paths`` (files and folders, see ``iter_files``), one item per file, in order.

    Never raises for a bad file: each one that can't be read comes back as a
    ``LoadFailure``, so callers decide whether to skip, warn or stop. Only
    ``KeyboardInterrupt`` and other non-``Exception`` signals get through.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = (Path(d) / "a.txt").write_text("To be, or not to be.")
    ...     [type(item).__name__ for item in load_documents([d, Path(d) / "gone.md"])]
    ['Document', 'LoadFailure']
    """
    for item in walk_files(paths):
        yield item if isinstance(item, LoadFailure) else load_document(item)


def load_document(path: PathLike) -> Document | LoadFailure:
    """Load one file as a ``Document``, or say why it can't be loaded; never raises for a bad file.

    ``.txt`` and ``.md``/``.markdown`` keep their text as is (line endings made
    ``\\n``, as Python's text mode does), ``.html``/``.htm`` keep the visible text
    in paragraphs, and ``.pdf`` joins its pages' text with blank lines.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = (Path(d) / "page.html").write_text("<p>Fish &amp; chips</p><script>x()</script>")
    ...     load_document(Path(d) / "page.html").text
    'Fish & chips'
    """
    path = Path(path)
    try:
        return _load(path)
    except Exception as e:  # a parser's bug on a hostile file costs that file, not the run
        return LoadFailure(str(path), f"could not be loaded ({type(e).__name__}: {e}); check or convert the file")


def _load(path: Path) -> Document | LoadFailure:
    source = str(path)
    kind = SUPPORTED_SUFFIXES.get(path.suffix.lower())
    if path.is_dir():
        return LoadFailure(source, _folder_reason(path))
    if kind is None:
        if not path.exists():
            return LoadFailure(source, _missing_reason(path))
        what = f"file type {path.suffix!r}" if path.suffix else "file without an extension"
        return LoadFailure(source, f"unsupported {what}; supported: {_SUPPORTED} (convert it to one of these)")
    try:
        data = _read_regular(path)
    except FileNotFoundError:
        return LoadFailure(source, _missing_reason(path))
    except PermissionError:
        return LoadFailure(source, "permission denied; make it readable (e.g. `chmod u+r`) or run as its owner")
    except OSError as e:
        return LoadFailure(source, f"cannot be read: {e.strerror or e}")
    if isinstance(data, _Problem):
        return LoadFailure(source, data.reason)
    if not data.strip():
        return LoadFailure(source, "empty: the file holds no text")
    text = _pdf_text(data) if kind == "pdf" else _decode(data)
    if isinstance(text, _Problem):
        return LoadFailure(source, text.reason)
    if not text.strip():
        if kind == "pdf":
            return LoadFailure(
                source, "no extractable text (a scanned PDF holds only images); run OCR first, e.g. `ocrmypdf`"
            )
        return LoadFailure(source, "empty: the file holds only whitespace")
    if kind == "html" and not (text := html_to_text(text)):
        return LoadFailure(source, "no visible text: only markup, scripts or styles")
    return Document(source=source, text=text, sha256=hashlib.sha256(data).hexdigest(), kind=kind)


@dataclass(frozen=True, slots=True)
class _Problem:
    reason: str


def _read_regular(path: Path) -> bytes | _Problem:
    """The bytes of ``path`` if it is a regular file; a FIFO or device is refused without blocking on it."""
    # O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting forever.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # checked on the open file: no swap after the check
            return _Problem(_not_regular_reason(path))
        return f.read()


def _not_regular_reason(path: Path) -> str:
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = 0
    kinds = [(stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
             (stat.S_ISBLK, "a device")]  # fmt: skip
    what = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"{what}, not a regular file; skipped (copy its contents to a file to load them)"


def _missing_reason(path: Path) -> str:
    if path.is_symlink():
        return "a broken symbolic link: its target does not exist"
    return f"no such file or folder (relative paths start from {Path.cwd()}); check the path"


def _folder_reason(path: Path) -> str:
    try:
        with os.scandir(path):
            pass
    except OSError as e:
        return f"a folder that can't be listed ({e.strerror or e}); check its permissions"
    return "a folder; pass it to load_documents(), which walks folders"


def _decode(data: bytes) -> str | _Problem:
    """UTF-8 text (with or without a byte-order mark), newlines made ``\\n``; never a guess at another encoding."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return _Problem("UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        return _Problem(
            f"not UTF-8: byte 0x{data[offset]:02x} at offset {offset} is invalid; convert it to UTF-8, "
            "e.g. `iconv -f latin1 -t utf-8 FILE > NEW` if it is Latin-1"
        )
    if "\x00" in text:
        return _Problem("binary data (it contains NUL bytes), not text; give its extension to a text file only")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _pdf_text(data: bytes) -> str | _Problem:
    # pypdf raises many types (PdfReadError, ValueError, KeyError, ...) on damaged
    # files; any of them means this file is unreadable, never that the run should stop.
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            return _Problem(
                "an encrypted PDF that needs a password; decrypt it first, "
                "e.g. `qpdf --decrypt --password=PASSWORD in.pdf out.pdf`"
            )
        pages = list(reader.pages)  # walks the page tree now, inside the try: a cyclic tree raises here
    except DependencyError as e:
        return _Problem(
            f"an encrypted PDF that pypdf can open only with an extra package ({e}); `pip install cryptography`"
        )
    except Exception as e:
        return _Problem(f"a corrupt or unreadable PDF ({type(e).__name__}: {e}); repair it, e.g. `qpdf in.pdf out.pdf`")
    texts = []
    for number, page in enumerate(pages, start=1):
        try:
            texts.append(page.extract_text().strip())
        except Exception as e:
            return _Problem(
                f"page {number} of the PDF can't be read ({type(e).__name__}: {e}); repair it, "
                "e.g. `qpdf in.pdf out.pdf`"
            )
    text = "\n\n".join(t for t in texts if t)
    return text.replace("\r\n", "\n").replace("\r", "\n")


# HTML: the visible text, one paragraph per block element.

_SKIP = frozenset({"script", "style", "head", "title", "template", "noscript"})
# fmt: off
_BLOCKS = frozenset({
    "address", "article", "aside", "blockquote", "body", "caption", "dd", "details", "div", "dl", "dt", "fieldset",
    "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "html", "li",
    "main", "nav", "ol", "p", "pre", "section", "summary", "table", "tbody", "tfoot", "thead", "tr", "ul",
})
# fmt: on
_CELLS = frozenset({"td", "th"})
# Elements that never have content or an end tag: hiding one hides nothing after it.
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
                   "track", "wbr"})  # fmt: skip
# What an open element is implicitly closed by (HTML's optional end tags), so a hidden <p> ends at the next block.
_CLOSED_BY = {"p": _BLOCKS, "li": {"li"}, "dt": {"dt", "dd"}, "dd": {"dt", "dd"}, "tr": {"tr"},
              "td": {"td", "th", "tr"}, "th": {"td", "th", "tr"}}  # fmt: skip
_HIDDEN_STYLE = re.compile(r"(?:^|;)\s*(?:display\s*:\s*none|visibility\s*:\s*hidden)\b", re.IGNORECASE)
# An unterminated tag or comment at the end of a page: a browser shows none of it.
_UNTERMINATED = re.compile(r"<[A-Za-z!/?]")
_PARAGRAPH, _LINE = object(), object()  # markers between runs of text


def _hidden(attrs: list[tuple[str, str | None]]) -> bool:
    """An element a browser doesn't show: ``hidden``, or inline ``display:none`` / ``visibility:hidden``."""
    return any(name == "hidden" or (name == "style" and _HIDDEN_STYLE.search(value or "")) for name, value in attrs)


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities arrive unescaped in handle_data
        self.parts: list[str | object] = []
        self._skipping: list[str] = []  # open elements whose content is dropped
        self._pre = 0  # depth of <pre>, whose line breaks are kept

    def set_cdata_mode(self, elem: str, **kwargs: Any) -> None:
        super().set_cdata_mode(elem, **kwargs)
        # As HTML (and Python 3.14) has it: only "</script" followed by a space, "/" or ">" ends a script,
        # so "</ script>" no longer ends it early and lets the rest of the script through as text.
        self.interesting = re.compile(rf"</{self.cdata_elem}(?=[\t\n\r\f />])", re.IGNORECASE)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body" and "head" in self._skipping:
            self._skipping.clear()  # an unclosed <head> ends where <body> begins
        if self._skipping and tag in _CLOSED_BY.get(self._skipping[-1], ()):
            self._skipping.pop()  # e.g. a hidden <p> ends where the next block begins
        if self._skipping or tag in _SKIP or _hidden(attrs):
            if tag not in _VOID:  # nested elements too, so the hidden one ends at its own end tag
                self._skipping.append(tag)
        elif tag in _BLOCKS:
            self.parts.append(_PARAGRAPH)
            if tag == "pre":
                self._pre += 1
        elif tag == "br":
            self.parts.append(_LINE)
        elif tag in _CELLS:
            self.parts.append(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not (self._skipping or tag in _SKIP or _hidden(attrs)):  # <script/> has no content to drop
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if self._skipping or tag in _SKIP:
            # Closing an element also closes any unclosed ones opened inside it.
            while tag in self._skipping and self._skipping.pop() != tag:
                pass
        elif tag in _BLOCKS:
            self.parts.append(_PARAGRAPH)
            if tag == "pre" and self._pre:
                self._pre -= 1
        elif tag in _CELLS:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if self._skipping:
            return
        if not self._pre:
            self.parts.append(data)
            return
        lines = data.split("\n")  # <pre> keeps its line breaks
        for i, line in enumerate(lines):
            if i:
                self.parts.append(_LINE)
            self.parts.append(line)

    def text(self) -> str:
        paragraphs: list[str] = []
        lines: list[str] = []
        line: list[str] = []

        def end_line() -> None:
            if words := "".join(line).split():
                lines.append(" ".join(words))
            line.clear()

        for part in [*self.parts, _PARAGRAPH]:
            if isinstance(part, str):
                line.append(part)
                continue
            end_line()
            if part is _PARAGRAPH and lines:
                paragraphs.append("\n".join(lines))
                lines.clear()
        return "\n\n".join(paragraphs)


def html_to_text(html: str) -> str:
    """The visible text of an HTML page: paragraphs for block elements, whitespace collapsed, entities unescaped.

    Script, style, head and template content is dropped, and so is what a browser
    hides: elements with the ``hidden`` attribute or an inline ``display:none``, and
    an unterminated tag or script at the end. ``<br>`` and the lines of ``<pre>``
    become single newlines.

    >>> html_to_text("<h1>Hamlet</h1><p>To be,&nbsp;or   not<br>to be</p><style>p {}</style>")
    'Hamlet\\n\\nTo be, or not\\nto be'
    """
    parser = _TextExtractor()
    parser.feed(html)
    if _UNTERMINATED.match(parser.rawdata):  # close() would hand "<script src=..." over as text
        parser.rawdata = ""
    parser.close()
    return parser.text()
