"""The demo's corpus: the docstrings of the Python standard library.

Every machine that runs Forge has them, they are English prose about code
(readable samples after two minutes of training), and they need no download
and no copy of anyone's text inside the package.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
from pathlib import Path

__all__ = ["stdlib_docstrings"]

_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__"}
_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_docstrings(directory: Path, *, min_chars: int = 40) -> Path:
    """Write the stdlib's docstrings to a text file in ``directory`` (once per Python); return its path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    tag = hashlib.sha256(f"{root}:{sys.version}".encode()).hexdigest()[:12]
    path = directory / f"stdlib-docstrings-{tag}.txt"
    if path.exists():
        return path
    docs: list[str] = []
    for file in sorted(root.rglob("*.py")):
        if _SKIP.intersection(file.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, _NODES) and (doc := ast.get_docstring(node)) and len(doc) >= min_chars:
                docs.append(doc)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
