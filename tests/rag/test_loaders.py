"""forge.rag.loaders: files and folders in, Documents or LoadFailures out, never an exception for a bad file."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

import pytest
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

from forge.rag.loaders import (
    Document,
    LoadFailure,
    file_sha256,
    html_to_text,
    iter_files,
    load_document,
    load_documents,
    printable,
)


def pdf_bytes(pages: list[str], *, user_password: str | None = None, owner_password: str | None = None) -> bytes:
    """A real PDF with one line of Helvetica text per page, written by pypdf."""
    writer = PdfWriter()
    font = {"/Type": "/Font", "/Subtype": "/Type1", "/BaseFont": "/Helvetica"}
    for text in pages:
        page = writer.add_blank_page(width=612, height=792)
        font_dict = DictionaryObject({NameObject(k): NameObject(v) for k, v in font.items()})
        fonts = DictionaryObject({NameObject("/F1"): font_dict})
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): fonts})
        content = DecodedStreamObject()
        content.set_data(b"BT /F1 12 Tf 72 720 Td (" + text.encode("latin-1") + b") Tj ET")
        page.replace_contents(content)
    if user_password is not None:
        writer.encrypt(user_password=user_password, owner_password=owner_password)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def loaded(path: Path) -> Document:
    item = load_document(path)
    assert isinstance(item, Document), item
    return item


def failed(path: Path) -> LoadFailure:
    item = load_document(path)
    assert isinstance(item, LoadFailure), item
    assert item.source == str(path)
    return item


# Text and Markdown


def test_text_and_markdown_load_as_is(tmp_path: Path) -> None:
    txt = write(tmp_path / "a.txt", "To be, or not to be:\nthat is the question.\n")
    md = write(tmp_path / "b.markdown", "# Hamlet\n\n*Act I*\n")
    doc = loaded(txt)
    assert doc == Document(
        source=str(txt),
        text="To be, or not to be:\nthat is the question.\n",
        sha256=hashlib.sha256(txt.read_bytes()).hexdigest(),
        kind="txt",
    )
    assert loaded(md).kind == "md"
    assert loaded(md).text == "# Hamlet\n\n*Act I*\n"


def test_windows_line_endings_and_byte_order_mark(tmp_path: Path) -> None:
    path = write(tmp_path / "win.TXT", b"\xef\xbb\xbfline one\r\nline two\r")
    doc = loaded(path)
    assert doc.text == "line one\nline two\n"
    assert doc.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # the bytes, BOM and all


def test_non_utf8_file_names_the_byte_offset(tmp_path: Path) -> None:
    path = write(tmp_path / "latin1.txt", "naïve café".encode("latin-1"))
    reason = failed(path).reason
    assert "not UTF-8" in reason
    assert "0xef at offset 2" in reason  # the ï, not a silent guess at Latin-1
    assert "iconv" in reason


def test_offset_counts_the_byte_order_mark(tmp_path: Path) -> None:
    path = write(tmp_path / "bom.md", b"\xef\xbb\xbfok \xff")
    assert "0xff at offset 6" in failed(path).reason


def test_utf16_and_binary_files_are_reported(tmp_path: Path) -> None:
    assert "UTF-16" in failed(write(tmp_path / "u16.txt", "hello".encode("utf-16"))).reason
    assert "NUL" in failed(write(tmp_path / "bin.txt", b"abc\x00def")).reason


def test_empty_files_are_reported(tmp_path: Path) -> None:
    assert "empty" in failed(write(tmp_path / "empty.txt", b"")).reason
    assert "empty" in failed(write(tmp_path / "blank.md", " \n\t\n")).reason


def test_unreadable_file_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # chmod does not stop root, so the test makes reading fail the way it does for other users.
    path = write(tmp_path / "secret.txt", "x")

    real_open = os.open

    def denied(file: str | os.PathLike[str], flags: int, *args: int) -> int:
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, flags, *args)

    monkeypatch.setattr(os, "open", denied)
    assert "permission denied" in failed(path).reason


# HTML


def test_html_keeps_visible_text_in_paragraphs(tmp_path: Path) -> None:
    page = """<!DOCTYPE html>
    <html><head><title>Not shown</title><style>p { color: red }</style>
    <script>var hidden = "<p>no</p>";</script></head>
    <body>
      <h1>Hamlet,   Prince of
          Denmark</h1>
      <p>Fish &amp; chips &lt;3 &eacute;t&#233; &#x263A;&nbsp;!</p>
      <div>To be,<br>or not to <b>be</b><i>ing</i></div>
      <script>alert("no")</script>
      <ul><li>one</li><li>two</li></ul>
      <table><tr><td>a</td><td>b</td></tr></table>
      <pre>line 1
    line 2</pre>
    </body></html>"""
    doc = loaded(write(tmp_path / "page.html", page))
    assert doc.kind == "html"
    assert doc.text == (
        "Hamlet, Prince of Denmark\n\n"
        "Fish & chips <3 été ☺ !\n\n"
        "To be,\nor not to being\n\n"
        "one\n\ntwo\n\n"
        "a b\n\n"
        "line 1\nline 2"
    )


def test_html_without_closing_head_or_with_nested_skips() -> None:
    assert html_to_text("<head><title>t</title><body><p>shown</p>") == "shown"
    assert html_to_text("<noscript><style>x</style>gone</noscript>kept") == "kept"
    assert html_to_text("<p>a<script/>b</p>") == "ab"


def test_html_with_only_markup_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.htm", "<html><head><title>x</title></head><body><script>1</script></body></html>")
    assert "no visible text" in failed(path).reason


# PDF


def test_pdf_pages_joined_with_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "play.pdf", pdf_bytes(["Act one, scene one.", "Act one, scene two."]))
    doc = loaded(path)
    assert doc.kind == "pdf"
    assert doc.text == "Act one, scene one.\n\nAct one, scene two."
    assert doc.sha256 == file_sha256(path)


def test_encrypted_pdf_needs_a_password(tmp_path: Path) -> None:
    path = write(tmp_path / "locked.pdf", pdf_bytes(["hidden"], user_password="secret"))
    reason = failed(path).reason
    assert "encrypted" in reason
    assert "password" in reason
    assert "qpdf --decrypt" in reason


def test_pdf_with_only_an_owner_password_opens(tmp_path: Path) -> None:
    path = write(tmp_path / "owner.pdf", pdf_bytes(["readable"], user_password="", owner_password="owner"))
    assert loaded(path).text == "readable"


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_pdf_is_reported(tmp_path: Path, damage: str) -> None:
    good = pdf_bytes(["some text"])
    data = b"%PDF-1.7\nthis is not a pdf" if damage == "garbage" else good[: len(good) // 3]
    reason = failed(write(tmp_path / "bad.pdf", data)).reason
    assert "corrupt" in reason or "can't be read" in reason or "no extractable text" in reason


def test_pdf_without_text_suggests_ocr(tmp_path: Path) -> None:
    writer = PdfWriter()
    writer.add_blank_page(width=612, height=792)
    buffer = io.BytesIO()
    writer.write(buffer)
    assert "OCR" in failed(write(tmp_path / "scan.pdf", buffer.getvalue())).reason


# Paths and folders


def test_folder_walk_is_sorted_recursive_and_skips_hidden_and_unsupported(tmp_path: Path) -> None:
    for name in [
        "b.md",
        "a.txt",
        "C.HTML",
        "notes.docx",
        "image.png",
        "README",
        ".hidden.txt",
        ".git/config.txt",
        "sub/z.pdf",
        "sub/.cache/x.txt",
        "sub/deeper/y.htm",
        "sub/deeper/y.json",
        "a_dir/m.markdown",
    ]:
        write(tmp_path / name, "x")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_files([tmp_path])]
    assert found == ["C.HTML", "a.txt", "a_dir/m.markdown", "b.md", "sub/deeper/y.htm", "sub/z.pdf"]


def test_each_file_comes_once(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "x")
    assert list(iter_files([tmp_path, path, str(path), tmp_path / "." / "a.txt"])) == [path]


def test_missing_path_is_a_failure_not_an_exception(tmp_path: Path) -> None:
    write(tmp_path / "ok.txt", "fine")
    missing = tmp_path / "nope" / "gone.txt"
    items = list(load_documents([tmp_path / "ok.txt", missing, str(tmp_path / "no_such_folder")]))
    assert [type(item) for item in items] == [Document, LoadFailure, LoadFailure]
    assert items[1] == LoadFailure(str(missing), items[1].reason)
    assert "no such file or folder" in items[1].reason
    assert str(missing) in str(items[1])


def test_named_unsupported_or_hidden_files_are_reported_not_dropped(tmp_path: Path) -> None:
    docx = write(tmp_path / "report.docx", "x")
    plain = write(tmp_path / "README", "x")
    hidden = write(tmp_path / ".notes.txt", "named, so loaded")
    items = list(load_documents([docx, plain, hidden]))
    assert isinstance(items[0], LoadFailure)
    assert "unsupported file type '.docx'" in items[0].reason
    assert ".pdf" in items[0].reason  # lists what is supported
    assert isinstance(items[1], LoadFailure)
    assert "without an extension" in items[1].reason
    assert isinstance(items[2], Document)


def test_unlistable_folder_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "a.txt", "x")
    locked = tmp_path / "locked"
    write(locked / "b.txt", "x")
    real_scandir = os.scandir

    def scandir(path: str | os.PathLike[str]) -> object:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    items = list(load_documents([tmp_path]))
    assert isinstance(items[0], Document)
    assert isinstance(items[1], LoadFailure)
    assert items[1].source == str(locked)
    assert "can't be listed" in items[1].reason


def test_symlinked_folders_are_not_followed(tmp_path: Path) -> None:
    write(tmp_path / "docs" / "a.txt", "x")
    try:
        (tmp_path / "docs" / "loop").symlink_to(tmp_path / "docs", target_is_directory=True)
    except OSError:
        pytest.skip("symbolic links are not available here")
    assert [p.name for p in iter_files([tmp_path / "docs"])] == ["a.txt"]


def test_a_bad_file_does_not_stop_the_rest(tmp_path: Path) -> None:
    write(tmp_path / "1.txt", "first")
    write(tmp_path / "2.pdf", b"not a pdf at all")
    write(tmp_path / "3.txt", b"\xff\xfe\xfd")
    write(tmp_path / "4.md", "last")
    items = list(load_documents([tmp_path]))
    assert [type(item).__name__ for item in items] == ["Document", "LoadFailure", "LoadFailure", "Document"]
    assert [Path(item.source).name for item in items] == ["1.txt", "2.pdf", "3.txt", "4.md"]


def test_file_sha256_streams_in_blocks(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    path = write(tmp_path / "blob.txt", data)
    assert file_sha256(path, block_size=97) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()


# Hostile and unlucky input (issue 14)


def cyclic_pdf_bytes() -> bytes:
    """A PDF whose page tree lists itself among its own kids: pypdf raises when it walks the pages."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [2 0 R 3 0 R] /Count 2 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_a_cyclic_pdf_page_tree_is_a_failure_and_the_rest_still_load(tmp_path: Path) -> None:
    write(tmp_path / "a.pdf", cyclic_pdf_bytes())
    write(tmp_path / "b.txt", "after the bad PDF")
    items = list(load_documents([tmp_path]))
    assert [type(item).__name__ for item in items] == ["LoadFailure", "Document"]
    assert "corrupt or unreadable PDF" in items[0].reason and "cyclic" in items[0].reason


def test_any_loader_crash_costs_only_that_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "a.html", "<p>first</p>")
    write(tmp_path / "b.txt", "second")
    monkeypatch.setattr("forge.rag.loaders.html_to_text", lambda html: [][1])  # a parser bug: IndexError
    items = list(load_documents([tmp_path]))
    assert isinstance(items[0], LoadFailure) and "IndexError" in items[0].reason
    assert isinstance(items[1], Document) and items[1].text == "second"

    def interrupted(html: str) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("forge.rag.loaders.html_to_text", interrupted)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C still stops the run
        list(load_documents([tmp_path]))


def _load_in_thread(path: Path) -> Document | LoadFailure | None:
    """load_document(path), or None if it is still blocked after a minute (a hang guard, not a timing test)."""
    result: list[Document | LoadFailure] = []
    thread = threading.Thread(target=lambda: result.append(load_document(path)), daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():  # unblock it: a writer lets the read of the FIFO finish
        with open(path, "wb"):
            pass
    return result[0] if result else None


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    item = _load_in_thread(fifo)
    assert isinstance(item, LoadFailure), "load_document blocked on a FIFO"
    assert "named pipe (FIFO)" in item.reason and "not a regular file" in item.reason
    write(tmp_path / "ok.md", "fine")
    items = list(load_documents([tmp_path]))  # inside a folder: reported, and the walk goes on
    found = [(Path(i.source).name, type(i).__name__) for i in items]
    assert found == [("ok.md", "Document"), ("pipe.txt", "LoadFailure")]
    assert list(iter_files([tmp_path])) == [tmp_path / "ok.md"]


def test_devices_named_directly_are_refused(tmp_path: Path) -> None:
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null here")
    link = tmp_path / "null.txt"
    link.symlink_to("/dev/null")  # a supported name, so it reaches the reader (as /dev/zero would, forever)
    assert "a device, not a regular file" in failed(link).reason


def test_symlinks_leaving_the_folder_are_reported_not_followed(tmp_path: Path) -> None:
    outside = write(tmp_path / "secret" / "passwd.txt", "root:x:0:0")
    docs = tmp_path / "docs"
    write(docs / "a.txt", "inside")
    write(docs / "sub" / "b.md", "also inside")
    try:
        (docs / "passwd.txt").symlink_to(outside)
        (docs / "up.md").symlink_to(Path("..") / "secret" / "passwd.txt")
        (docs / "inner.md").symlink_to(docs / "sub" / "b.md")  # stays in the tree: followed (once)
        (docs / "broken.txt").symlink_to(docs / "gone.txt")
    except OSError:
        pytest.skip("symbolic links are not available here")
    items = list(load_documents([docs]))
    by_name = {Path(i.source).name: i for i in items}
    assert set(by_name) == {"a.txt", "inner.md", "passwd.txt", "up.md"}
    for name in ["passwd.txt", "up.md"]:
        failure = by_name[name]
        assert isinstance(failure, LoadFailure) and "outside the folder" in failure.reason
        assert str(outside) in failure.reason
    assert by_name["a.txt"].text == "inside" and by_name["inner.md"].text == "also inside"  # type: ignore[union-attr]
    assert [p.name for p in iter_files([docs])] == ["a.txt", "inner.md"]  # sub/b.md is inner.md's target
    assert loaded(docs / "passwd.txt").text == "root:x:0:0"  # named directly, the user asked for it


def test_html_drops_hidden_elements() -> None:
    page = (
        '<p>shown <span style="color: red; DISPLAY : none !important">secret one</span>too</p>'
        '<div style="display:none"><div>secret two</div><p>secret three<br>unclosed</div>'
        "<p hidden>secret four<p>after a hidden p"
        '<ul><li style="visibility:hidden">secret five<li>item</ul>'
        '<img style="display:none" src="x.png">still shown<span style="display:none"/> here'
    )
    assert html_to_text(page) == "shown too\n\nafter a hidden p\n\nitem\n\nstill shown here"


@pytest.mark.parametrize(
    "page",
    [
        "<p>shown</p><script>var secret = 1;",  # never closed
        '<p>shown</p><script src="x.js" secret text',  # a start tag cut off at the end
        "<p>shown</p><script>secret()</ script>secret too</script>",  # "</ script>" does not close it
        "<p>shown</p><style>.secret { }",
        "<p>shown</p><!-- secret comment never closed",
    ],
)
def test_html_drops_broken_scripts_and_styles(page: str) -> None:
    assert html_to_text(page) == "shown"


def test_printable_escapes_control_characters() -> None:
    assert printable("plain name.txt") == "plain name.txt"
    assert printable("a\nb\x1b[31m\u202e.txt") == "a\\nb\\x1b[31m\\u202e.txt"
    assert printable("line 1\nline 2\t\x07", keep="\n\t") == "line 1\nline 2\t\\x07"
    assert str(LoadFailure("evil\nname.txt", "bad\x1b[2J")) == "evil\\nname.txt: bad\\x1b[2J"
