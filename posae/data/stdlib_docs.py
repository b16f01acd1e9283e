"""The embedded default text: docstrings of the running Python's standard library.

Real English prose that needs no download. Files are visited in sorted path order and
each file's docstrings in `ast.walk` order (module, then classes and functions breadth
first), so the text is the same on every run of the same Python version.
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_version() -> str:
    """Identifies the text: the same CPython version gives the same docstrings."""
    return "python-" + ".".join(map(str, sys.version_info[:3]))


def stdlib_files(root: Path) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        files += [Path(folder) / n for n in sorted(names) if n.endswith(".py")]
    return files


def iter_stdlib_docstrings(root: Path | None = None) -> Iterator[str]:
    """Yield every non-empty docstring, cleaned by `ast.get_docstring`."""
    for path in stdlib_files(root or stdlib_root()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes in old modules
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError):
                continue  # deliberately broken test fixtures (e.g. lib2to3/tests/data)
        for node in ast.walk(tree):
            if isinstance(node, DOCUMENTED):
                doc = ast.get_docstring(node)
                if doc and doc.strip():
                    yield doc
