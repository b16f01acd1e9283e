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
from collections.abc import Collection, Iterator
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


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of a stdlib file: email/mime/text.py -> email.mime.text,
    email/__init__.py -> email, os.py -> os."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def iter_stdlib_module_docstrings(
    root: Path | None = None, packages: Collection[str] | None = None
) -> Iterator[tuple[str, str]]:
    """Yield (dotted module name, docstring) for every non-empty docstring, in the order of
    `iter_stdlib_docstrings`; the module is the file the docstring is in (for sparse
    probing's `stdlib_packages` task, whose label is its first component). With
    `packages`, only files of those top-level packages/modules are read."""
    root = root or stdlib_root()
    for path in stdlib_files(root):
        module = module_name(path, root)
        if packages is not None and module.split(".")[0] not in packages:
            continue
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
                    yield module, doc


def iter_stdlib_docstrings(root: Path | None = None) -> Iterator[str]:
    """Yield every non-empty docstring, cleaned by `ast.get_docstring`."""
    for _, doc in iter_stdlib_module_docstrings(root):
        yield doc
